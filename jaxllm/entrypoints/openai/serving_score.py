"""vLLM's classification and scoring routes: POST /classify, /score (/v1/score) and /rerank
(/v1/rerank, /v2/rerank). Each runs pooling requests (``PoolingParams``) as /v1/embeddings does;
scores come from a cross-encoder or from the cosine of embeddings (see ``jaxllm.scoring``)."""

from __future__ import annotations

import numpy as np

from jaxllm.entrypoints.openai.protocol import (
    ClassificationData,
    ClassificationRequest,
    ClassificationResponse,
    RerankDocument,
    RerankRequest,
    RerankResponse,
    RerankResult,
    RerankUsage,
    ScoreRequest,
    ScoreResponse,
    ScoreResponseData,
    UsageInfo,
    random_id,
)
from jaxllm.entrypoints.openai.serving_embedding import OpenAIServingEmbedding, _last_output
from jaxllm.entrypoints.openai.serving_engine import APIError, final_outputs
from jaxllm.lora.request import LoRARequest
from jaxllm.pooling_params import PoolingParams
from jaxllm.scoring import plan_scores

_PARAM_FIELDS = ("truncate_prompt_tokens", "use_activation", "activation")


class OpenAIServingScores(OpenAIServingEmbedding):
    async def create_classify(self, request: ClassificationRequest) -> ClassificationResponse:
        lora = self._checked_request(request, "classify", "Classification")
        params = self._params(request, "classify")
        request_id, prompts, outputs = await self._pooled(request, params, "classify", lora)
        vectors = [out.outputs.data for out in outputs]
        labels = self.engine.engine.classifier.labels
        data = [ClassificationData(index=i, label=labels[int(np.argmax(v))], probs=[float(x) for x in v],
                                   num_classes=len(v)) for i, v in enumerate(vectors)]
        return ClassificationResponse(id=request_id, model=self.model_name(request.model), data=data,
                                      usage=UsageInfo.of(sum(map(len, prompts)), 0))

    async def create_score(self, request: ScoreRequest) -> ScoreResponse:
        lora = self._checked_request(request, "score", "Score")
        scores, num_tokens = await self._scores(request, _texts(request.text_1), _texts(request.text_2),
                                                ("text_1", "text_2"), lora)
        data = [ScoreResponseData(index=i, score=score) for i, score in enumerate(scores)]
        return ScoreResponse(id=random_id("score"), model=self.model_name(request.model), data=data,
                             usage=UsageInfo.of(num_tokens, 0))

    async def create_rerank(self, request: RerankRequest) -> RerankResponse:
        lora = self._checked_request(request, "score", "Rerank")
        if request.top_n < 0:
            raise APIError(f"top_n={request.top_n} must be >= 0 (0: all documents)", param="top_n")
        scores, num_tokens = await self._scores(request, [request.query], request.documents,
                                                ("query", "documents"), lora)
        ranked = sorted(range(len(scores)), key=lambda i: -scores[i])
        top_n = request.top_n or len(ranked)
        results = [RerankResult(index=i, document=RerankDocument(text=request.documents[i]), relevance_score=scores[i])
                   for i in ranked[:top_n]]
        return RerankResponse(id=random_id("rerank"), model=self.model_name(request.model),
                              usage=RerankUsage(total_tokens=num_tokens), results=results)

    # -- internals -------------------------------------------------------------------------------
    def _checked_request(self, request, task: str, api: str) -> LoRARequest | None:
        lora = self._accepted(request)
        classifier = self.engine.engine.classifier
        if task == "classify" and (classifier is None or classifier.per_token):
            raise APIError(f"The model does not support {api} API: {self.served.name} is not a sequence "
                           "classifier (*ForSequenceClassification)")
        if task == "score" and classifier is not None and classifier.per_token:
            raise APIError(f"The model does not support {api} API: {self.served.name} is a token classifier "
                           "(*ForTokenClassification), not a cross-encoder")
        if task == "score" and classifier is not None and classifier.num_labels != 1:
            raise APIError(f"The model does not support {api} API: {self.served.name} is a classifier of "
                           f"{classifier.num_labels} labels, not a cross-encoder (one label)")
        return lora

    @staticmethod
    def _params(request, task: str) -> PoolingParams:
        try:
            return PoolingParams(truncate_prompt_tokens=request.truncate_prompt_tokens,
                                 use_activation=request.use_activation, activation=request.activation, task=task)
        except ValueError as exc:
            raise APIError(str(exc), param=next((n for n in _PARAM_FIELDS if str(exc).startswith(f"{n}=")), None)) from exc

    async def _scores(self, request, data_1: list[str], data_2: list[str], names: tuple[str, str],
                      lora: LoRARequest | None) -> tuple[list[float], int]:
        """Each pair's score and the tokens the requests read."""
        for name, texts in zip(names, (data_1, data_2), strict=True):
            if not texts or any(not t for t in texts):
                raise APIError(f"{name} must hold non-empty texts", param=name)
        try:
            plan = plan_scores(self.engine.engine.classifier, self.tokenizer, data_1, data_2)
        except ValueError as exc:
            raise APIError(str(exc), param=names[0]) from exc
        params = self._params(request, plan.task)
        prompts = [ids if plan.task == "classify" else self.prompt_token_lists(ids, param=names[0])[0]
                   for ids in plan.prompts]
        prompts = [self._checked(params.truncated_prompt(ids, self.served.max_model_len), "/".join(names))
                   for ids in prompts]
        vectors = await self._run(random_id("score"), prompts, params, request.priority, lora)
        return plan.scores(vectors), sum(map(len, prompts))

    async def _run(self, request_id: str, prompts: list[list[int]], params: PoolingParams, priority: int,
                   lora: LoRARequest | None) -> list:
        ids = [f"{request_id}-{i}" for i in range(len(prompts))]
        streams = await self.start(ids, prompts, params, priority=priority, lora_request=lora)
        return [out.outputs.data for out in await final_outputs(self.engine, streams, _last_output)]


def _texts(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)
