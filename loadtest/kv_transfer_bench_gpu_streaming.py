"""Part 3 of the GPU KV-transfer benchmark (`kv_transfer_bench --gpu`, streaming): how much of
the KV transfer a real prefill leaves exposed.

  The real engine (llama3-8b preset, bf16, dummy weights) on cuda:0 prefills 2048 tokens in
  one step, first alone (the prefill time), then with `LayerStreamer` over the IPC transport;
  the engine's own allocator hands out the block ids (after the warm-ups: descending, one run
  per block). Figure kv.exposed_fraction_2k = (streamed step + tail - prefill alone) /
  prefill alone, the tail being the end of the step to Commit's answer (target <= 0.1); beside
  it the step slowdown, the tail, host time per send_layer, launches and runs per layer, and
  the same in memcpy mode.
"""

from __future__ import annotations

import logging
import statistics
import time

import torch

from engine.presets import preset
from engine.sampling_params import SamplingParams
from kv_transfer.client import KVTransferClient
from kv_transfer.cuda_ipc import CopyMode, CudaIpcTransport
from kv_transfer.ipc_plan import contiguous_runs
from loadtest.kv_transfer_bench_gpu_common import GREEDY, median_us, synced_s

log = logging.getLogger("kv_transfer_bench")


def exposed_figure(client: KVTransferClient, trials: int) -> dict:
    from engine.config import EngineConfig
    from engine.engine import Engine
    from kv_transfer.layer_stream import LayerStreamer, TransferStatus

    cfg = EngineConfig(
        model=preset("llama3-8b"),
        dtype="bfloat16",
        device="cuda:0",
        num_kv_blocks=600,
        max_num_batched_tokens=2048,
        max_model_len=4096,
        enforce_eager=True,
        enable_prefix_caching=False,
    )
    t0 = time.perf_counter()
    engine = Engine(cfg)
    log.info("engine ready in %.1f s", time.perf_counter() - t0)
    prompt = [(i * 31) % 120000 + 5 for i in range(2048)]
    one = SamplingParams(max_tokens=1, temperature=0.0)
    transport = CudaIpcTransport.connect(client, engine.pool, CopyMode.KERNEL)
    streamer = LayerStreamer(engine, client, transport)
    sends: list[tuple[float, tuple[int, ...], tuple[int, ...]]] = []  # (host s, local, remote)
    tail_parts: dict[str, list[float]] = {"finish": [], "commit": []}  # the tail's two waits
    open_session, commit_future = transport.open, client.commit_future

    def timed(fn, part: str):  # noqa: ANN001, ANN202
        def call(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            s0 = time.perf_counter()
            result = fn(*args, **kwargs)
            tail_parts[part].append(time.perf_counter() - s0)
            return result

        return call

    def timed_open(reservation):  # noqa: ANN001, ANN202 - records each send_layer call
        session = open_session(reservation)
        send = session.send_layer

        def send_layer(layer: int, first: int, ids) -> None:  # noqa: ANN001
            s0 = time.perf_counter()
            send(layer, first, ids)
            remote = reservation.block_ids[first : first + len(ids)]
            sends.append((time.perf_counter() - s0, tuple(ids), tuple(remote)))

        session.send_layer = send_layer
        session.finish = timed(session.finish, "finish")
        return session

    def timed_commit(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - sent to answered
        s0 = time.perf_counter()
        future = commit_future(*args, **kwargs)
        future.add_done_callback(lambda _: tail_parts["commit"].append(time.perf_counter() - s0))
        return future

    transport.open = timed_open
    client.commit_future = timed_commit  # the streamer's client: restored below

    def plain(request_id: str) -> float:
        engine.add_request(request_id, prompt, one, hold_kv=True)
        elapsed = synced_s(engine.step)
        engine.release(request_id)
        return elapsed

    def streamed(request_id: str) -> tuple[float, float, int, int]:
        streamer.add_request(request_id, prompt, GREEDY)
        torch.cuda.synchronize(0)
        t0 = time.perf_counter()
        (outcome,) = streamer.step()
        step_s = time.perf_counter() - t0 - outcome.record.exposed_s
        assert outcome.status is TransferStatus.COMMITTED, outcome.detail
        return step_s, outcome.record.exposed_s, outcome.record.num_bytes, outcome.record.num_chunks

    def trials_of(mode: CopyMode, warmups: int) -> dict:
        transport.copy_mode = mode
        for warm in range(warmups):
            plain(f"wp{mode.value}{warm}")
            streamed(f"ws{mode.value}{warm}")
        del sends[:]
        for part in tail_parts.values():
            del part[:]
        prefill, step, tail, launches = [], [], [], []
        for trial in range(trials):  # alternating
            prefill.append(plain(f"p{mode.value}{trial}"))
            s, e, num_bytes, num_chunks = streamed(f"s{mode.value}{trial}")
            step.append(s)
            tail.append(e)
            launches.append(num_chunks / engine.pool.num_layers)
        runs = [len(contiguous_runs(local, remote)) for _, local, remote in sends]
        prefill_s, step_s, tail_s = (statistics.median(x) for x in (prefill, step, tail))
        log.info("2k prefill, %s: alone %s s; streamed step %s s; tail %s s (finish %s ms, "
                 "commit %s ms); send_layer host median %.1f us; runs per layer %s", mode.value,
                 [round(x, 4) for x in prefill], [round(x, 4) for x in step],
                 [round(x, 5) for x in tail], [round(x * 1e3, 2) for x in tail_parts["finish"]],
                 [round(x * 1e3, 2) for x in tail_parts["commit"]],
                 median_us([h for h, _, _ in sends]), sorted(set(runs)))  # fmt: skip
        return {
            "value": (step_s + tail_s - prefill_s) / prefill_s,
            "prefill_s": prefill_s,
            "streamed_step_s": step_s,
            "tail_s": tail_s,
            "step_slowdown_fraction": (step_s - prefill_s) / prefill_s,
            "tail_fraction": tail_s / prefill_s,
            "tail_finish_ms": statistics.median(tail_parts["finish"]) * 1e3,
            "tail_commit_ms": statistics.median(tail_parts["commit"]) * 1e3,
            "send_host_us_median": median_us([h for h, _, _ in sends]),
            "launches_or_copies_per_layer": statistics.median(launches),
            "runs_per_layer": statistics.median(runs),
            "bytes": num_bytes,
        }

    health_s = []
    for _ in range(10):  # a bare gRPC round trip, to compare the Commit with
        s0 = time.perf_counter()
        client.health()
        health_s.append(time.perf_counter() - s0)
    try:
        kernel = trials_of(CopyMode.KERNEL, warmups=2)
        try:  # the fallback, for comparison: its failure keeps the kernel's figure
            memcpy = trials_of(CopyMode.MEMCPY, warmups=1)
        except Exception as e:
            log.exception("streaming in memcpy mode failed")
            memcpy = {"failed": repr(e)}
    finally:
        transport.close()
        del client.commit_future
    assert engine.num_free_blocks == 600
    return {
        "name": "kv.exposed_fraction_2k",
        "unit": "ratio",
        "target": "<= 0.1",
        "how": "(streamed step + tail to Commit's answer - prefill alone) / prefill alone",
        **kernel,
        "health_rpc_ms": statistics.median(health_s) * 1e3,
        "memcpy_mode": memcpy,
    }
