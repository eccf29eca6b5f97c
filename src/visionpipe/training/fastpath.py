"""A stage's speed switches, resolved from its ``FastPathConfig`` for the device it runs on."""

from __future__ import annotations

from pydantic import BaseModel

from visionpipe.config import CompileMode, FastPathConfig


class FastPath(BaseModel):
    """The switches resolved for one device."""

    autocast_bf16: bool
    channels_last: bool
    cudnn_benchmark: bool
    data_on_device: bool
    compile: bool
    static_graph: bool
    decode_on_device: bool = False
    compile_mode: CompileMode = "default"


def resolve_fast_path(cfg: FastPathConfig, device_type: str, planned_images: int = 0,
                      distributed: bool = False, grad_accumulation: int = 1) -> FastPath:
    """The switches of ``cfg`` for ``device_type``; an empty switch is on on CUDA, off on the CPU.

    ``channels_last`` is the exception: empty means on, on the CPU too. ``planned_images`` (the
    images the stage will train on) decides an empty ``compile``, ``distributed`` an empty
    ``compile_mode``. CUDA graphs (``reduce-overhead``) are never used with gradient
    accumulation: their replays overwrite the gradient buffers that the next micro-batch adds
    to (PyTorch issue 169545); ``default`` is used instead, also in place of an explicit choice.
    """
    gpu = device_type == "cuda"
    compile_ = (gpu and planned_images >= cfg.compile_min_images) if cfg.compile is None \
        else cfg.compile
    mode: CompileMode = cfg.compile_mode or (
        "reduce-overhead" if gpu and not distributed else "default")
    if mode == "reduce-overhead" and grad_accumulation > 1:
        mode = "default"

    def pick(value: bool | None) -> bool:
        return gpu if value is None else value

    return FastPath(autocast_bf16=pick(cfg.autocast_bf16),
                    channels_last=cfg.channels_last is not False,
                    cudnn_benchmark=gpu and pick(cfg.cudnn_benchmark),
                    data_on_device=gpu and pick(cfg.data_on_device), compile=compile_,
                    static_graph=pick(cfg.static_graph),
                    decode_on_device=cfg.decode_on_device, compile_mode=mode)


def wants_streaming(cfg: FastPathConfig, train_bytes: int) -> bool:
    """Whether to stream a training split of ``train_bytes`` decoded bytes.

    An explicit ``cfg.streaming`` decides; empty, a split above ``cfg.memory_limit_gb`` streams.
    """
    if cfg.streaming is not None:
        return cfg.streaming
    return train_bytes > cfg.memory_limit_gb * 2**30
