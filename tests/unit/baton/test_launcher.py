"""`cuda_device_index`: Ray's GPU id to torch's device index when workers see every GPU."""

from __future__ import annotations

import pytest

pytest.importorskip("ray")

from baton.launcher import cuda_device_index  # noqa: E402


@pytest.mark.parametrize(
    ("ray_gpu_id", "visible", "index"),
    [
        (0, None, 0),  # unset: Ray numbers the node's GPUs as torch does
        ("3", None, 3),
        ("2", "2,3", 0),  # --gpus 2,3: Ray says 2 and 3, torch sees cuda:0 and cuda:1
        (3, "2,3", 1),
        ("1", "0,1,2,3", 1),
        ("5", " 4, 5 ", 1),  # spaces around entries
        ("GPU-9f2c", "GPU-11aa,GPU-9f2c", 1),  # UUIDs
    ],
)
def test_ray_gpu_id_maps_to_its_position_in_cuda_visible_devices(
    ray_gpu_id: int | str, visible: str | None, index: int
) -> None:
    assert cuda_device_index(ray_gpu_id, visible) == index


def test_a_gpu_outside_cuda_visible_devices_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"GPU '1'.*CUDA_VISIBLE_DEVICES='2,3'"):
        cuda_device_index("1", "2,3")
