"""The scoring routes (``/v1/rerank`` with its ``/rerank`` and ``/v2/rerank`` aliases, ``/v1/score``
and ``/score``), as a mixin of the ASGI ``App``: parse, ``model.score_pairs``, build the response.
Errors are in OpenAI's format, ``param`` included (as vLLM answers them)."""
from __future__ import annotations

from ..errors import RtserveError
from .protocols import openai as oai
from .protocols import scoring
from .responses import JSON, Response, until_disconnect

RERANK_PATHS = ("/v1/rerank", "/rerank", "/v2/rerank")
SCORE_PATHS = ("/v1/score", "/score")
SCORING_PATHS = frozenset(RERANK_PATHS + SCORE_PATHS)


def as_openai_error(e: RtserveError) -> oai.OpenAIError:
    """An error of any layer in OpenAI's format, keeping its status, ``param`` and headers."""
    if isinstance(e, oai.OpenAIError):
        return e
    type_ = "server_error" if e.status >= 500 else "rate_limit_error" if e.status == 429 else "invalid_request_error"
    return oai.OpenAIError(e.message, status=e.status, param=e.param, type_=type_, headers=e.headers)


class ScoringRoutes:
    """Mixed into ``App``: uses ``_method`` and the OpenAI mixin's ``_body`` and ``_model``."""

    async def _scoring(self, scope, receive) -> Response:
        """``scope['path']`` (without a trailing slash) is one of ``SCORING_PATHS``."""
        try:
            self._method(scope["method"], "POST")
            rerank = scope["path"].rstrip("/") in RERANK_PATHS
            body = await self._body(scope, receive)
            req = scoring.parse_rerank(body) if rerank else scoring.parse_score(body)
            model = self._model(req.model)
            scores, num_tokens = await until_disconnect(receive, model.score_pairs(req.pairs))
        except RtserveError as e:
            raise as_openai_error(e) from None
        encode = scoring.rerank_response if rerank else scoring.score_response
        return Response(200, encode(req, scores, num_tokens), JSON)
