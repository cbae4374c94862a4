"""The adapter on the wire from an owner to the server (`transport.dtype`).

fp32: the trained adapter itself, as every Flower strategy and mod expects it.
fp16: the owner's update (its adapter minus the global adapter it received), as float16.
int8: the update as int8 with one float32 scale per tensor (symmetric, round to nearest: each value is off by
      at most half its tensor's scale, max |update| / 254), the scale under the tensor's name + SCALE.

Sending the update rather than the adapter keeps the precision where the change is: with int8, a fixed
LoRA A of values around 0.1 would otherwise drown a 0.001 update. The server adds the decoded update back to
the global adapter it sent (the same fp32 tensors the owner received), so both ends agree exactly on what was
sent. The server's broadcast stays fp32: every owner starts a round from the exact global adapter.

Quantizing an owner's DP output is post-processing: it costs no privacy. `decode` accepts exactly the
configured format (names, dtypes, shapes, finite values, positive scales) and raises ValueError on anything
else. The ClientApp encodes in `transport_mod`, outside every other mod, so Flower's clipping mod (user-level
DP) still sees and returns the fp32 adapter.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Context, Message

from .config import TRANSPORT_DTYPES
from .protocol import ARRAYS, CONFIG, TRANSPORT_DTYPE, check_arrays

SCALE = "::scale"  # int8: the key of a tensor's scale is the tensor's key + this
INT8_MAX = 127


def encode(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], dtype: str) -> ArrayRecord:
    """The reply's arrays for `state` (the trained adapter, fp32), given the global adapter `reference`."""
    if dtype not in TRANSPORT_DTYPES:
        raise ValueError(f"transport.dtype must be one of {', '.join(TRANSPORT_DTYPES)} (got {dtype!r})")
    if dtype == "fp32":
        return ArrayRecord({k: v.float().contiguous() for k, v in state.items()})
    update = {k: state[k].float() - reference[k].float() for k in state}
    if dtype == "fp16":
        return ArrayRecord({k: u.half().contiguous() for k, u in update.items()})
    arrays = {}
    for key, u in update.items():
        scale = float(u.abs().max()) / INT8_MAX
        scale = scale if scale > 0 else 1.0  # an all-zero update: any scale decodes it exactly
        arrays[key] = torch.round(u / scale).clamp(-INT8_MAX, INT8_MAX).to(torch.int8).contiguous()
        arrays[key + SCALE] = torch.tensor([scale], dtype=torch.float32)
    return ArrayRecord(arrays)


def layout(reference: dict[str, torch.Tensor], dtype: str) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Every array name the format allows, with its dtype and shape."""
    if dtype == "fp32":
        return {k: (torch.float32, tuple(v.shape)) for k, v in reference.items()}
    if dtype == "fp16":
        return {k: (torch.float16, tuple(v.shape)) for k, v in reference.items()}
    expected = {k: (torch.int8, tuple(v.shape)) for k, v in reference.items()}
    return expected | {k + SCALE: (torch.float32, (1,)) for k in reference}


def decode(arrays: ArrayRecord, reference: dict[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    """The owner's adapter (fp32) from a reply's arrays in format `dtype`; ValueError unless the arrays are
    exactly that format for this adapter, with finite values."""
    state = arrays.to_torch_state_dict()
    check_arrays(state, layout(reference, dtype), f"the {dtype} format")
    if dtype == "fp32":
        return {k: state[k] for k in reference}
    if dtype == "fp16":
        return {k: reference[k].float() + state[k].float() for k in reference}
    decoded = {}
    for key, start in reference.items():
        scale = float(state[key + SCALE])
        if not scale > 0:
            raise ValueError(f"adapter array {key + SCALE} must be a positive scale (got {scale})")
        if (state[key] < -INT8_MAX).any():
            raise ValueError(f"adapter array {key} holds -128, outside the symmetric int8 range")
        decoded[key] = start.float() + state[key].float() * scale
    return decoded


def wire_bytes(arrays: ArrayRecord) -> int:
    """Bytes of the arrays' payloads (what an ArrayRecord carries, serialized)."""
    return sum(len(array.data) for array in arrays.values())


def transport_mod(msg: Message, context: Context, call_next) -> Message:
    """ClientApp mod: send the reply's adapter in the format the server's train config names (fp32 if it names
    none). It wraps every other mod, so they see the fp32 adapter; refusals and errors pass unchanged."""
    dtype = "fp32"
    if CONFIG in msg.content.config_records:
        dtype = str(msg.content[CONFIG].get(TRANSPORT_DTYPE, "fp32"))
    reply = call_next(msg, context)
    if dtype == "fp32" or reply.has_error() or ARRAYS not in reply.content.array_records:
        return reply
    reference = msg.content[ARRAYS].to_torch_state_dict()
    reply.content[ARRAYS] = encode(reply.content[ARRAYS].to_torch_state_dict(), reference, dtype)
    return reply
