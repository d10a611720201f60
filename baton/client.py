"""A Python client for Baton's serving API, for programs and load tests.

    from baton.client import BatonClient
    with BatonClient("127.0.0.1:50051") as client:
        for delta in client.generate_stream("Hello", max_tokens=16, temperature=0):
            print(delta.text, end="", flush=True)
        result = client.generate("Hello", max_tokens=16)   # the whole answer at once
        print(result.text, result.usage.cached_tokens, result.timings.ttft_ms)

Errors are `grpc.RpcError` with the server's status code and message.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import grpc

from protos import serving_pb2 as pb
from protos import serving_pb2_grpc as pb_grpc


@dataclass
class GenerateResult:
    request_id: str = ""
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = ""
    usage: pb.Usage = field(default_factory=pb.Usage)
    timings: pb.Timings = field(default_factory=pb.Timings)
    num_messages: int = 0
    logprobs: list[pb.TokenLogprob] = field(default_factory=list)  # when asked for


def finish_reason_name(value: int) -> str:
    return pb.FinishReason.Name(value).removeprefix("FINISH_REASON_").lower()


def build_request(
    prompt: str | Sequence[int],
    *,
    request_id: str = "",
    max_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int | None = None,
    stop: Sequence[str] = (),
    stop_token_ids: Sequence[int] = (),
    ignore_eos: bool = False,
    cache_salt: str = "",
    logprobs: int | None = None,
) -> pb.GenerateRequest:
    sampling = pb.Sampling(
        stop=list(stop), stop_token_ids=list(stop_token_ids), ignore_eos=ignore_eos
    )
    for name, value in (
        ("max_tokens", max_tokens),
        ("temperature", temperature),
        ("top_p", top_p),
        ("top_k", top_k),
        ("seed", seed),
        ("logprobs", logprobs),
    ):
        if value is not None:
            setattr(sampling, name, value)
    req = pb.GenerateRequest(request_id=request_id, sampling=sampling, cache_salt=cache_salt)
    if isinstance(prompt, str):
        req.text = prompt
    else:
        req.token_ids.ids.extend(prompt)
    return req


class BatonClient:
    def __init__(
        self, address: str, api_key: str | None = None, timeout_s: float | None = 300.0
    ) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._channel = grpc.insecure_channel(address)
        self._stub = pb_grpc.ServingStub(self._channel)
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> BatonClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stream(self, request: pb.GenerateRequest, timeout_s: float | None = None) -> grpc.Call:
        """The raw response stream (iterate it; `.cancel()` aborts the request everywhere)."""
        return self._stub.Generate(
            request, timeout=timeout_s or self.timeout_s, metadata=self._metadata
        )

    def generate_stream(
        self, prompt: str | Sequence[int], **kwargs: object
    ) -> Iterator[pb.GenerateResponse]:
        timeout_s = kwargs.pop("timeout_s", None)
        yield from self.stream(build_request(prompt, **kwargs), timeout_s)  # type: ignore[arg-type]

    def generate(self, prompt: str | Sequence[int], **kwargs: object) -> GenerateResult:
        result = GenerateResult()
        for resp in self.generate_stream(prompt, **kwargs):
            result.request_id = resp.request_id
            result.token_ids.extend(resp.token_ids)
            result.logprobs.extend(resp.logprobs)
            result.text += resp.text
            result.num_messages += 1
            if resp.finish_reason:
                result.finish_reason = finish_reason_name(resp.finish_reason)
                result.usage = resp.usage
                result.timings = resp.timings
        return result

    def health(self) -> pb.ServingHealthResponse:
        return self._stub.Health(pb.ServingHealthRequest(), timeout=10, metadata=self._metadata)

    def stats(self) -> pb.StatsResponse:
        return self._stub.Stats(pb.StatsRequest(), timeout=10, metadata=self._metadata)
