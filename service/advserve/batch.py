"""Turns user arrays (numpy, torch or nested lists from JSON) into validated tensors on the device.

Every check names the offending tensor in `InvalidArgument.field` ("tensors.<name>"): unknown or
missing names, ragged or non-numeric data, wrong rank, mismatched B or T, empty batches, masks that
are not 0/1, NaN/Inf on unmasked positions. Masked positions of token tensors are set to 0, so what
a client leaves there (NaN included) cannot leak into a result. JSON has no NaN: a null in a numeric
tensor reads as NaN (ignored where masked, refused where not, as binary NaN is). Group ids are
factorized as Python objects, never widened to a fixed width, each at most MAX_GROUP_ID_LENGTH long.
Running out of memory while converting a tensor is a PayloadTooLarge naming it.

Checks of values (0/1 masks, finiteness) are computed on the device as 0-d verdicts and read together
(`Checks`: one host read, on CUDA one sync, per request); only when one fails is the error looked for
and worded, in the order the checks are listed above, so the first mistake is the one named.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import itertools
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from .device import host_scalars, to_device
from .errors import AdvserveError, DeadlineExceeded, InvalidArgument, PayloadTooLarge, RequestTimeout, Unavailable

LAYOUTS = ("padded", "packed")
DEFAULT_MAX_TOKENS = 1 << 28  # per request, B·T (the padded form of a packed request)
TOKEN_TENSORS = frozenset({
    "token_rewards", "response_mask", "values", "old_logprobs", "ref_logprobs", "logprobs", "rollout_logprobs",
    "advantages", "returns", "old_values", "entropy", "token_losses", "rollout_is_weights",
    "sum_pi_squared",
})
SEQUENCE_TENSORS = frozenset({"rewards", "group_ids", "greedy_rewards"})
COMPONENT_TENSORS = frozenset({"reward_components"})  # [B, K]: K values per sequence (any K >= 1, not T)
ALL_TENSORS = TOKEN_TENSORS | SEQUENCE_TENSORS | COMPONENT_TENSORS | {"cu_seqlens"}
DTYPES = {"float32": torch.float32, "float64": torch.float64}
MAX_GROUP_ID_LENGTH = 1024  # bytes of a group id (a string's in UTF-8, as /v2 BYTES carry it); longer: a 400
SHAPE_HINTS = {  # (tensor, rank given) -> (the tensor it was probably meant as, the hint)
    ("rewards", 2): ("token_rewards", "per-token rewards [B, T] go in 'token_rewards'"),
    ("token_rewards", 1): ("rewards", "one outcome reward per sequence [B] goes in 'rewards'"),
}


@dataclass
class Batch:
    """Validated tensors. `tensors` holds every float tensor in the compute dtype on the device,
    finite, and 0 at masked positions; `mask` [B, T] bool and `valid` the same as 0/1 in the compute
    dtype; `lengths` [B] valid tokens per row (int32);
    `group_index` [B] long with `group_labels` (ids in order of first appearance) when group_ids were
    given, and `group_layout` (sizes [G], order [B], starts [G]: see `functional.groups.Groups`),
    computed on the host with the index (None: computed on the device when needed); `scan`
    (advantages, returns) [B, T] of the estimator's scan when the kernel that validated the batch
    computed it too (`build_batch`'s `scan`), `scan_spec` the ScanSpec it was computed for:
    the values it read are then not in `tensors` (the scan was all that reads them), so the batch
    serves those parameters only."""

    tensors: dict[str, Tensor]
    mask: Tensor
    valid: Tensor
    lengths: Tensor
    group_index: Tensor | None
    group_labels: list | None
    layout: "PackedLayout | None" = None
    scan: tuple[Tensor, Tensor] | None = None
    scan_spec: Any = None
    group_layout: tuple[Tensor, Tensor, Tensor] | None = None

    @staticmethod
    def concat(batches: list["Batch"]) -> "Batch":
        """Rows of several batches as one (right-padded to the widest); group ids offset so that no two
        batches share a group. Only for computing: results are split back by row ranges."""
        width = max(b.mask.shape[1] for b in batches)

        def cat(tensors: list[Tensor]) -> Tensor:
            return torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1])) if t.ndim == 2 else t
                              for t in tensors])

        names = batches[0].tensors.keys()
        group_index, labels = None, None
        if batches[0].group_index is not None:
            offsets, total = [], 0
            for b in batches:
                offsets.append(total)
                total += len(b.group_labels)
            group_index = torch.cat([b.group_index + off for b, off in zip(batches, offsets)])
            labels = [label for b in batches for label in b.group_labels]
        return Batch(tensors={name: cat([b.tensors[name] for b in batches]) for name in names},
                     mask=cat([b.mask for b in batches]), valid=cat([b.valid for b in batches]),
                     lengths=torch.cat([b.lengths for b in batches]), group_index=group_index, group_labels=labels)

    def output(self, padded: Tensor | None) -> Tensor | None:
        """A [B, T] result in the caller's layout, contiguous (a scan's result or a coalesced request's
        rows may be a strided view, which encoders refuse): [B, T], or flat [N] for a packed request."""
        if padded is None:
            return None
        return padded.contiguous() if self.layout is None else self.layout.to_packed(padded)

    @functools.cached_property
    def tokens(self) -> int:
        """Valid tokens in the batch (read once: a device sync on CUDA)."""
        return int(self.lengths.sum())

    @property
    def batch_size(self) -> int:
        return self.mask.shape[0]


class Checks:
    """A request's value checks, read from the device together.

    A check is a verdict (a 0-d bool tensor, True: passed, computed where the data is) and `on_fail`,
    run on the host only when the verdict says it did not pass. `on_fail` raises the check's error, or
    adds a closer look (another check) when the verdict can fail for data that is fine (a sum overflows
    although every term is finite), or returns. `settle()` reads every verdict with one host read (on a
    device one `device.host_scalars` copy: one sync) and runs the failed checks' `on_fail` in the
    order they were added; closer looks are read together in a next round. An error that would
    overtake an earlier check's closer look waits for it, so the error raised is the one an immediate
    read of each check would have raised first. Errors found on the host (shapes, dtypes) must not
    overtake an earlier check either: `host_errors_after()`."""

    def __init__(self, read_later: bool = False) -> None:
        """read_later: the verdicts will be read after the request has been computed (on a device, with
        its results): what the computation reads must then not wait for a closer look (`_zero_masked`)."""
        self._pending: list[tuple[Tensor | bool, Callable[[], None]]] = []
        self._error: AdvserveError | None = None
        self.read_later = read_later

    def add(self, passed: Tensor | bool, on_fail: Callable[[], None]) -> None:
        self._pending.append((passed, on_fail))

    @property
    def pending(self) -> bool:
        """Whether checks wait to be settled."""
        return bool(self._pending)

    def verdicts(self) -> Tensor | None:
        """The verdicts of the checks added so far that are tensors, stacked ([K] bool), for a caller that
        reads them with other numbers and passes what it read to `settle`; None when there are none."""
        tensors = [passed for passed, _ in self._pending if isinstance(passed, Tensor)]
        return torch.stack(tensors) if tensors else None

    def settle(self, read: Sequence[Any] | None = None) -> None:
        """Read the verdicts (one host read a round; data that passes takes one round) and run `on_fail`
        of each failed check, in order. `read`: the first round's verdicts as read already (the host
        values of `verdicts()`, taken when no check had been added since). The error raised is raised
        again by every later call."""
        if self._error is not None:
            raise self._error
        try:
            self._settle(read)
        except AdvserveError as error:
            self._error = error
            raise

    def _settle(self, read: Sequence[Any] | None) -> None:
        while self._pending:
            pending, self._pending = self._pending, []
            if read is None:
                read = _read_verdicts([passed for passed, _ in pending if isinstance(passed, Tensor)])
            read, taken = None, iter(read)  # a next round (closer looks) reads its own
            verdicts = [next(taken) if isinstance(passed, Tensor) else passed for passed, _ in pending]
            for passed, (_, on_fail) in zip(verdicts, pending):
                if passed:
                    continue
                if not self._pending:
                    on_fail()
                    continue
                try:
                    on_fail()
                except AdvserveError as error:  # an earlier check looks closer in the next round: it comes first
                    self._pending.append((False, functools.partial(_reraise, error)))

    @contextlib.contextmanager
    def host_errors_after(self) -> Iterator[None]:
        """An error raised in the block comes after the failures of the checks added so far: where one
        of them fails, its error is raised instead (a mistake found on the host, or an error of a
        computation that ran on data the checks had not yet passed). Errors of the server's state, not
        of the request (overloaded, unavailable, out of time), are raised at once, without a read."""
        try:
            yield
        except (Unavailable, DeadlineExceeded, RequestTimeout):
            raise
        except Exception as error:  # noqa: BLE001 - re-raised below unless a check failed first
            found = error
        else:
            return
        try:
            self.settle()
        except AdvserveError as earlier:
            raise earlier from None  # the error of the request, not one raised while handling another
        raise found


def _reraise(error: Exception) -> None:
    raise error


def _read_verdicts(verdicts: list[Tensor]) -> list[bool]:
    """0-d bool tensors (of one device) as Python values, with one host read: on the CPU the values
    themselves, on a device one `host_scalars` copy."""
    if not verdicts:
        return []
    stacked = torch.stack(verdicts)
    if stacked.device.type == "cpu":
        return stacked.tolist()
    return host_scalars({"verdicts": stacked})["verdicts"]


def _field(name: str) -> str:
    return f"tensors.{name}"


def _what(dtype: np.dtype | torch.dtype) -> str:
    """A dtype in words for messages: "strings", "floats", "booleans", ... (no numpy codes)."""
    if isinstance(dtype, torch.dtype):
        if dtype == torch.bool:
            return "booleans"
        return "complex numbers" if dtype.is_complex else "floats" if dtype.is_floating_point else "integers"
    return {"U": "strings", "S": "bytes strings", "O": "mixed values", "c": "complex numbers", "f": "floats",
            "b": "booleans", "i": "integers", "u": "integers", "M": "dates", "m": "time spans"}.get(dtype.kind,
                                                                                                "raw records")


@contextlib.contextmanager
def _fits(name: str) -> Iterator[None]:
    """Running out of memory while converting tensor `name` is the request's size: PayloadTooLarge."""
    try:
        yield
    except MemoryError:
        raise PayloadTooLarge(f"tensor {name!r} does not fit in the server's memory: send a smaller batch",
                              field=_field(name)) from None


def _to_array(name: str, value: Any) -> np.ndarray | Tensor:
    """A numeric tensor as given (torch, numpy) or read from nested lists (JSON, `_from_lists`)."""
    if isinstance(value, Tensor):
        return value
    if isinstance(value, np.ndarray):
        array = value
    elif isinstance(value, (list, tuple)):
        array = _from_lists(name, value)
    else:
        raise InvalidArgument(f"tensor {name!r} must be an array (nested list, numpy array or torch tensor), "
                              f"got {type(value).__name__}", field=_field(name))
    if array.dtype.kind not in "biuf":
        raise InvalidArgument(f"tensor {name!r} must be numeric, got {_what(array.dtype)}", field=_field(name))
    return array


def _from_lists(name: str, value: list | tuple) -> np.ndarray:
    """Nested lists [B] or [B, T] -> a numpy array: bool, int64 or float64 as the elements are; null
    reads as NaN. The elements' types are read first (one C-level pass: set(map(type, chain))), so a
    string is refused before numpy could widen B·T elements to the longest one (or parse "1" as 1)."""
    top = set(map(type, value))
    kinds = set(map(type, itertools.chain.from_iterable(value))) if top and top <= {list, tuple} else top
    if any(issubclass(kind, (str, bytes)) for kind in kinds):
        raise InvalidArgument(f"tensor {name!r} must be numeric, got strings", field=_field(name))
    dtype = np.bool_ if kinds and kinds <= {bool} else np.int64 if kinds and kinds <= {bool, int} else np.float64
    try:
        try:
            return np.asarray(value, dtype=dtype)
        except OverflowError:  # an integer beyond int64
            return np.asarray(value, dtype=np.float64)
    except (ValueError, TypeError):
        raise _not_numeric(name, value) from None


def _not_numeric(name: str, value: list | tuple) -> InvalidArgument:
    """Why nested lists are no numeric array: strings, ragged rows, or other values. Looks at one level
    at a time with C-level builtins (map, chain); only refused requests come here."""
    level: list = list(value)
    kinds: set[type] = set()
    for _ in range(64):
        kinds = set(map(type, level))
        if any(issubclass(kind, (str, bytes)) for kind in kinds):
            return InvalidArgument(f"tensor {name!r} must be numeric, got strings", field=_field(name))
        lists = {kind for kind in kinds if issubclass(kind, (list, tuple))}
        if not lists:
            break
        if lists != kinds or len(set(map(len, level))) > 1:
            return InvalidArgument(f"tensor {name!r} is ragged (rows of different lengths)", field=_field(name))
        level = list(itertools.chain.from_iterable(level))
    what = ", ".join(sorted({"null" if kind is type(None) else kind.__name__ for kind in kinds}))
    return InvalidArgument(f"tensor {name!r} must hold numbers (null reads as NaN), got {what}", field=_field(name))


def _numeric(name: str, array: np.ndarray | Tensor, dtype: torch.dtype, device: torch.device,
             widened_by_multiply: bool = False) -> Tensor:
    """A numeric array as a tensor on `device` in `dtype` (converted where it is cheapest: on the device).
    `widened_by_multiply`: the caller multiplies it by a `dtype` tensor next, which widens bfloat16,
    float16, integers and booleans exactly as `.to(dtype)` would: those stay in their dtype (one pass
    less)."""
    tensor = _numeric_on_device(name, array, device)
    if widened_by_multiply and tensor.dtype in _WIDENED_BY_MUL and torch.promote_types(tensor.dtype, dtype) == dtype:
        return tensor
    return tensor.to(dtype)


def _numeric_on_device(name: str, array: np.ndarray | Tensor, device: torch.device) -> Tensor:
    """A numeric array as a tensor on `device`, in its own dtype."""
    if isinstance(array, Tensor):
        if array.is_complex() or not (array.is_floating_point() or array.dtype in _INT_TORCH or array.dtype == torch.bool):
            raise InvalidArgument(f"tensor {name!r} must be numeric, got {_what(array.dtype)}", field=_field(name))
        return to_device(array, device)
    return to_device(torch.as_tensor(array), device)


_INT_TORCH = {torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8}
_WIDENED_BY_MUL = _INT_TORCH | {torch.bool, torch.bfloat16, torch.float16, torch.float32, torch.float64}


def _group_index(value: Any, device: torch.device,
                 layout: bool = False) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor] | None, list]:
    """Dense group index [B] (long, on `device`) in order of first appearance, its layout on `device`
    (`_on_device`; with `layout` only, for at most HOST_LAYOUT_ROWS rows, else None), and the ids in
    that order.

    `value` [B]: integers (list, numpy or torch) or strings (list, numpy str/bytes/object array, as
    verl's non_tensor_batch["uid"]). Integer arrays are factorized by np.unique; anything else as
    Python objects by dicts built in C (`_factorize`), so a long id is never copied into a fixed-width
    array of B such ids. String ids are at most MAX_GROUP_ID_LENGTH long; integers and strings are
    never mixed (is 1 the group of "1"? the transports would disagree)."""
    field = _field("group_ids")
    if isinstance(value, Tensor):
        if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            raise InvalidArgument(f"group_ids must be integers or strings, got {_what(value.dtype)}", field=field)
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        if value.ndim != 1:
            raise InvalidArgument(f"group_ids must be 1-D [B], got shape {list(value.shape)}", field=field)
        if value.dtype.kind in "iu":
            labels, first, inverse = np.unique(value, return_index=True, return_inverse=True)
            order = np.argsort(first, kind="stable")  # group k = k-th id to appear
            rank = np.empty_like(order)
            rank[order] = np.arange(order.size)
            return *_on_device(rank[inverse.reshape(-1)].astype(np.int64), device, layout), labels[order].tolist()
        if value.dtype.kind in "US":  # more characters than the limit are more UTF-8 bytes too
            if value.size and int(np.char.str_len(value).max()) > MAX_GROUP_ID_LENGTH:
                raise _id_too_long(field)
        elif value.dtype != object:
            raise InvalidArgument(f"group_ids must be integers or strings, got {_what(value.dtype)}", field=field)
        value = value.tolist()
    elif not isinstance(value, (list, tuple)):
        raise InvalidArgument(f"group_ids must be an array [B] of integers or strings, got {type(value).__name__}",
                              field=field)
    index, labels = _factorize(value)
    return *_on_device(index, device, layout), labels


# Rows up to which a batch's group layout is computed on the host (`build_batch(triton=True)`):
# about 50 ns a row there, against a few kernel launches on a device, which a larger batch's sort outruns
HOST_LAYOUT_ROWS = 8192


def _on_device(index: np.ndarray, device: torch.device,
               layout: bool) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor] | None]:
    """The group index [B] and, with `layout` and at most HOST_LAYOUT_ROWS rows, its layout (sizes [G],
    order [B], starts [G]: the rows sorted by group, stably, and each group's first entry in order),
    computed on the host and copied to `device` together (pinned, non-blocking: no sync): the compute
    then launches no kernel for them."""
    if not layout or index.size > HOST_LAYOUT_ROWS:
        return to_device(torch.from_numpy(index), device), None
    sizes = np.bincount(index) if index.size else np.zeros(0, np.int64)
    order = np.argsort(index, kind="stable")
    starts = np.cumsum(sizes) - sizes
    packed = to_device(torch.from_numpy(np.concatenate([index, sizes, order, starts]).astype(np.int64)), device)
    rows, count = index.size, sizes.size
    return packed[:rows], (packed[rows:rows + count], packed[rows + count:2 * rows + count], packed[2 * rows + count:])


def _factorize(ids: list | tuple) -> tuple[np.ndarray, list]:
    """Python ids [B] -> (group index [B] int64 in order of first appearance, the ids in that order).

    Every step is a C-level builtin over the ids (set(map(type)), max(map(len)), dict.fromkeys, map of
    a dict look-up): no Python loop per row, and each id is hashed once, whatever its length."""
    field = _field("group_ids")
    kinds = {_id_kind(t) for t in set(map(type, ids))}  # a handful of types, not B
    if None in kinds:
        bad = next(t for t in set(map(type, ids)) if _id_kind(t) is None)
        what = {list: "nested lists", tuple: "nested lists", type(None): "null", float: "floats",
                bool: "booleans"}.get(bad, bad.__name__)
        if what == "nested lists":
            raise InvalidArgument("group_ids must be 1-D [B], got nested lists", field=field)
        raise InvalidArgument(f"group_ids must be integers or strings, got {what}", field=field)
    if len(kinds) > 1:
        raise InvalidArgument("group_ids mix integers and strings (is 1 the group of \"1\"?): give every id as "
                              "one kind", field=field)
    if kinds and kinds != {"int"}:
        check_id_length(ids, field)
    codes = dict(zip(dict.fromkeys(ids), range(len(ids))))  # id -> its group, numbered by first appearance
    index = np.fromiter(map(codes.__getitem__, ids), dtype=np.int64, count=len(ids))
    labels = list(codes)
    if kinds == {"int"}:
        labels = list(map(int, labels))  # numpy integers (an object array's) as plain ints
    return index, labels


def _id_kind(kind: type) -> str | None:
    """"int", "str" or "bytes" for the type of a group id; None for anything else (bool is not an id)."""
    if issubclass(kind, (bool, np.bool_)):
        return None
    if issubclass(kind, (int, np.integer)):
        return "int"
    return "str" if issubclass(kind, str) else "bytes" if issubclass(kind, bytes) else None


_UTF8 = functools.partial(str.encode, encoding="utf-8", errors="surrogatepass")


def check_id_length(ids: list | tuple, field: str) -> None:
    """InvalidArgument naming `field` when an id (all str, or all bytes) is longer than
    MAX_GROUP_ID_LENGTH bytes, a string's counted in UTF-8 so that every transport agrees. C-level: a
    string is encoded only when its length in characters cannot decide (between 1/4 and 1 of the limit)."""
    longest = max(map(len, ids), default=0)
    if longest > MAX_GROUP_ID_LENGTH or (
            longest * 4 > MAX_GROUP_ID_LENGTH and isinstance(ids[0], str)
            and max(map(len, map(_UTF8, ids))) > MAX_GROUP_ID_LENGTH):
        raise _id_too_long(field)


def _id_too_long(field: str) -> InvalidArgument:
    return InvalidArgument(f"a group id is longer than {MAX_GROUP_ID_LENGTH} bytes (UTF-8); ids may have at most "
                           f"{MAX_GROUP_ID_LENGTH}", field=field)


class PackedLayout:
    """Sequences packed end to end: token tensors are flat [N], row i is [cu_seqlens[i], cu_seqlens[i+1]).

    The engine computes on the right-padded [B, T] form (T = the longest row) and returns flat
    results, so every estimator and loss gives exactly its padded result.
    """

    def __init__(self, cu_seqlens: np.ndarray | Tensor, device: torch.device, max_tokens: int):
        field = _field("cu_seqlens")
        cu = cu_seqlens if isinstance(cu_seqlens, Tensor) else torch.as_tensor(cu_seqlens)
        if cu.is_floating_point() or cu.is_complex() or cu.dtype == torch.bool:
            raise InvalidArgument(f"cu_seqlens must be integers, got {_what(cu.dtype)}", field=field)
        if cu.ndim != 1 or cu.numel() < 2:
            raise InvalidArgument(f"cu_seqlens must be [B + 1] with B >= 1, got shape {list(cu.shape)}", field=field)
        # the offsets define the padded shape, so the host needs them: read once, where they were given
        # (host memory, as every transport gives them: no device sync; a device tensor: one)
        offsets = (cu_seqlens if isinstance(cu_seqlens, np.ndarray) else cu.detach().cpu().numpy()).astype(np.int64)
        steps = np.diff(offsets)
        if offsets[0] != 0 or (steps < 0).any():
            raise InvalidArgument("cu_seqlens must start at 0 and be non-decreasing", field=field)
        self.batch_size = offsets.size - 1
        self.tokens = int(offsets[-1])
        self.width = max(int(steps.max()), 1)
        if max(self.tokens, self.batch_size * self.width) > max_tokens:  # before anything of that size exists
            raise PayloadTooLarge(f"cu_seqlens describes {self.tokens} tokens ({self.batch_size} rows, the longest "
                                  f"{self.width}): more than the limit of {max_tokens} tokens per request", field=field)
        cu = to_device(torch.from_numpy(offsets), device)
        lengths = to_device(torch.from_numpy(steps), device)
        row = torch.repeat_interleave(torch.arange(self.batch_size, device=device), lengths, output_size=self.tokens)
        col = torch.arange(self.tokens, device=device) - cu[row]
        self.flat_index = row * self.width + col  # position of each packed token in the padded [B, T]
        self.lengths = lengths

    def to_padded(self, flat: Tensor) -> Tensor:
        padded = flat.new_zeros(self.batch_size * self.width)
        return padded.index_copy_(0, self.flat_index, flat).view(self.batch_size, self.width)

    def to_packed(self, padded: Tensor) -> Tensor:
        return padded.reshape(-1).index_select(0, self.flat_index)


def _unpack(raw: Mapping[str, Any], device: torch.device, max_tokens: int) -> tuple[dict[str, Any], PackedLayout]:
    """Packed inputs -> the same tensors right-padded, and the layout to pack results back."""
    if raw.get("cu_seqlens") is None:
        raise InvalidArgument("layout 'packed' needs tensor 'cu_seqlens' [B + 1]", field=_field("cu_seqlens"))
    with _fits("cu_seqlens"):
        layout = PackedLayout(_to_array("cu_seqlens", raw["cu_seqlens"]), device, max_tokens)
    padded: dict[str, Any] = {}
    for name in sorted(raw, key=_check_order):  # one order on every transport (build_batch)
        value = raw[name]
        if name == "cu_seqlens" or value is None:
            continue
        if name not in TOKEN_TENSORS:  # [B] as given: build_batch converts it
            padded[name] = value
            continue
        with _fits(name):
            array = _to_array(name, value)
            if tuple(array.shape) != (layout.tokens,):
                raise InvalidArgument(f"tensor {name!r} must be flat [N] with N = cu_seqlens[-1] = {layout.tokens} "
                                      f"in layout 'packed', got shape {list(array.shape)}", field=_field(name))
            padded[name] = layout.to_padded(to_device(torch.as_tensor(array), device))
    if "response_mask" not in padded:  # every packed token is a response token unless a mask says otherwise
        columns = torch.arange(layout.width, device=device)
        padded["response_mask"] = columns < layout.lengths.unsqueeze(1)
    return padded, layout


def build_batch(
    raw: Mapping[str, Any],
    *,
    allowed: Iterable[str],
    required: Iterable[str],
    dtype: torch.dtype,
    device: torch.device,
    context: str,
    layout: str = "padded",
    max_tokens: int = DEFAULT_MAX_TOKENS,
    needed_by: Mapping[str, str] | None = None,
    hints: Mapping[str, str] | None = None,
    keep_masked: Iterable[str] = (),
    checks: Checks | None = None,
    scan: Any = None,
    triton: bool = False,
) -> Batch:
    """Validate `raw` (name -> array) and convert it. `context` names the caller in messages;
    `needed_by` (tensor -> what needs it) overrides it for a missing tensor, and `hints` (tensor ->
    text) ends that message with how to do without it.

    layout "padded": token tensors [B, T]; "packed": token tensors flat [N] with cu_seqlens [B + 1]
    (response_mask optional: all packed tokens are valid by default). More than `max_tokens` tokens
    (B·T padded) is a PayloadTooLarge error, raised before anything of that size is allocated.
    Tensors are checked in one order whatever the order of `raw` (response_mask first, then by name),
    so that every transport names the same tensor for the same mistake.
    `keep_masked`: token tensors also kept as given, masked positions included, under the name
    "<name>:unmasked" (then finite everywhere: verl sums masked token rewards).
    `checks`: where the value checks go, for the caller to add its own and `settle()` them all with one
    host read; without it they are settled here, before returning.
    `scan`: an `estimators.ScanSpec` when the caller's estimator starts from that scan and the numba
    kernels may run (a CPU device): a padded batch of exactly the rewards, the mask and the values
    the scan reads is then validated and scanned in one pass (`scanned_batch`), its `scan` set; where
    that pass finds a mistake, the checks below run and word it.
    `triton`: the request runs the Triton kernels (on a GPU): a small batch's group layout is computed on
    the host with its index (`Batch.group_layout`, for the group kernels: no kernel launched for it), and
    the mask and each float token tensor are checked and converted in one launch each (`kernels.validate`).
    """
    if not isinstance(raw, Mapping):
        raise InvalidArgument("tensors must be an object mapping tensor names to arrays", field="tensors")
    if layout not in LAYOUTS:
        raise InvalidArgument(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}", field="layout")
    allowed = set(allowed) | ({"cu_seqlens"} if layout == "packed" else set())
    required = set(required) - ({"response_mask"} if layout == "packed" else set())
    for name in sorted(raw, key=_check_order):
        if name not in allowed:
            kind = "not used by" if name in ALL_TENSORS else "unknown for"
            if name == "cu_seqlens":
                kind, context = "only for", "layout 'packed'"
            from .hints import verl_hint  # (imported here: hints imports this module)

            raise InvalidArgument(f"tensor {name!r} is {kind} {context}{verl_hint('tensor', name)}; accepted: "
                                  f"{', '.join(sorted(allowed))}", field=_field(name))
    for name in sorted(required):
        if raw.get(name) is None:
            hint = (hints or {}).get(name)
            raise InvalidArgument(f"{(needed_by or {}).get(name, context)} needs tensor {name!r}"
                                  f"{': ' + hint if hint else ''}", field=_field(name))

    packed = None
    if layout == "packed":
        raw, packed = _unpack(raw, device, max_tokens)
    arrays: dict[str, Any] = {}
    for name in sorted(raw, key=_check_order):
        value = raw[name]
        if value is not None:
            with _fits(name):  # group ids stay as given until factorized below
                arrays[name] = value if name == "group_ids" else _to_array(name, value)
    batch_size, length = _check_shapes({name: _shape(name, array) for name, array in arrays.items()}, allowed)
    if batch_size * max(length, 1) > max_tokens:
        raise PayloadTooLarge(f"{batch_size} x {length} tokens: more than the limit of {max_tokens} tokens per "
                              "request", field="tensors.response_mask")

    if scan is not None and packed is None:
        batch = scanned_batch(arrays, scan, dtype)
        if batch is not None:
            return batch
    own_checks = checks is None
    checks = Checks() if own_checks else checks
    tensors: dict[str, Tensor] = {}
    group_index, group_labels, group_layout = None, None, None
    kernel_checks = _KernelChecks(len(arrays), device, checks) if triton else None
    with checks.host_errors_after():
        with _fits("response_mask"):
            mask, valid, lengths = _mask(arrays["response_mask"], dtype, device, checks, kernel_checks)
        for name, array in arrays.items():
            if name == "response_mask":
                continue
            with _fits(name):
                if name == "group_ids":
                    group_index, group_layout, group_labels = _group_index(array, device, triton)
                    continue
                if name in TOKEN_TENSORS:
                    if name in keep_masked:
                        unmasked = _numeric(name, array, dtype, device)
                        checks.add(*_finite(unmasked, lambda name=name: InvalidArgument(
                            f"tensor {name!r} has NaN or Inf, which masked_token_rewards='sum' adds up (masked "
                            "positions included)", field=_field(name)), checks))
                        tensors[f"{name}:unmasked"] = array = unmasked
                    # the engine's invariant: 0 where the mask is 0
                    zeroed = None if kernel_checks is None else kernel_checks.zero_masked(name, array, mask, dtype)
                    tensors[name] = zeroed if zeroed is not None else _zero_masked(name, array, mask, valid, dtype,
                                                                                    device, tensors, checks)
                else:
                    tensors[name] = _numeric(name, array, dtype, device)
                    checks.add(*_finite(tensors[name], lambda name=name: InvalidArgument(
                        f"tensor {name!r} has NaN or Inf", field=_field(name)), checks))
    if own_checks:
        checks.settle()
    return Batch(tensors=tensors, mask=mask, valid=valid, lengths=lengths, group_index=group_index,
                 group_labels=group_labels, layout=packed, group_layout=group_layout)


def scanned_batch(arrays: Mapping[str, np.ndarray | Tensor], scan: Any, dtype: torch.dtype) -> Batch | None:
    """The Batch of `arrays` (shapes checked, on the CPU) with its `scan` (an estimators.ScanSpec)
    computed, by `kernels.cpu.scan`: validation, the zeroed rewards and the scan in one pass. None when
    the arrays are not exactly what the scan reads (response_mask, one of rewards and token_rewards,
    values when it takes them, old_logprobs and ref_logprobs with a KL penalty of an estimator the
    kernel has), are not all real numbers, or fail a check: the caller validates them the torch way,
    which words the mistake. What only the scan reads (values, the log-probs) is not kept in the batch."""
    from .kernels import cpu  # imports numba

    rewards_name = "token_rewards" if "token_rewards" in arrays else "rewards"
    kl = scan.kl_coef > 0
    if set(arrays) != ({"response_mask", rewards_name} | ({"values"} if scan.values else set())
                       | ({"old_logprobs", "ref_logprobs"} if kl else set())):
        return None
    if kl and scan.kl_estimator not in cpu.KL_KINDS:
        return None
    if any(isinstance(a, Tensor) and (a.is_complex() or a.requires_grad or a.device.type != "cpu")
           for a in arrays.values()):
        return None

    tensors = {}
    for name in sorted(arrays, key=_check_order):
        with _fits(name):
            if name == "response_mask":
                given_mask = torch.as_tensor(arrays[name]).contiguous()
            else:
                tensors[name] = _numeric(name, arrays[name], dtype, torch.device("cpu")).contiguous()
    with _fits("response_mask"):  # its outputs: the batch's size
        result = cpu.scan(tensors.get("token_rewards"), tensors.pop("values", None), given_mask, scan.gamma,
                          scan.lam, scan.gaps, outcome=tensors.get("rewards"),
                          old_logprobs=tensors.pop("old_logprobs", None), ref_logprobs=tensors.pop("ref_logprobs", None),
                          kl_coef=scan.kl_coef, kl_estimator=scan.kl_estimator, kl_clamp=scan.kl_clamp, clip=scan.clip,
                          whiten=scan.whiten)
    if result is None:
        return None
    if "token_rewards" in tensors:
        tensors["token_rewards"] = result.rewards
    valid = given_mask if given_mask.dtype == dtype else result.mask.to(dtype)
    return Batch(tensors=tensors, mask=result.mask, valid=valid, lengths=result.lengths, group_index=None,
                 group_labels=None, scan=(result.advantages, result.returns), scan_spec=scan)


def _check_order(name: Any) -> tuple[bool, str]:
    return name != "response_mask", str(name)


def _shape(name: str, array: Any) -> tuple[int, ...]:
    """The shape of a converted tensor, or of group ids as given: a list's length (nesting inside it is
    refused by `_group_index`)."""
    if isinstance(array, (list, tuple)):
        return (len(array),)
    if not isinstance(array, (np.ndarray, Tensor)):
        raise InvalidArgument(f"tensor {name!r} must be an array (list, numpy array or torch tensor), got "
                              f"{type(array).__name__}", field=_field(name))
    return tuple(array.shape)


def _mask(value: np.ndarray | Tensor, dtype: torch.dtype, device: torch.device,
          checks: Checks, kernels: "_KernelChecks | None" = None) -> tuple[Tensor, Tensor, Tensor]:
    """response_mask as (bool [B, T], 0/1 in `dtype` [B, T], valid tokens per row [B] int32).

    Numbers must be 0 or 1: one verdict in `checks` (range, and the sum equals the number of
    non-zeros); a float mask in the compute dtype is not copied, its row sums are the lengths.
    `kernels`: checked and converted by the Triton kernel instead (`kernels.validate.mask_of`).
    """
    tensor = value if isinstance(value, Tensor) else torch.as_tensor(value)
    if tensor.dtype != torch.bool and (tensor.is_complex() or not (tensor.is_floating_point() or tensor.dtype in _INT_TORCH)):
        raise InvalidArgument(f"response_mask must be booleans or 0/1 numbers, got {_what(tensor.dtype)}",
                              field=_field("response_mask"))
    tensor = to_device(tensor, device)

    def refuse() -> None:
        raise InvalidArgument("response_mask must hold only 0/1 (or booleans)", field=_field("response_mask"))

    if kernels is not None:
        return kernels.mask(tensor, dtype, refuse)
    mask = tensor if tensor.dtype == torch.bool else tensor.bool()
    if tensor.dtype == torch.bool or not tensor.numel():
        return mask, tensor.to(dtype), _count_valid(mask, dim=1)

    if not tensor.is_floating_point():
        low, high = torch.aminmax(tensor)
        checks.add((low >= 0) & (high <= 1), refuse)
        return mask, tensor.to(dtype), _count_valid(mask, dim=1)
    # within [0, 1], every value is 0 or 1 iff the sum equals the number of non-zeros; the row sums
    # are then the lengths (one read of the float mask, not a second of the bool one)
    row_sums = tensor.sum(dim=1, dtype=_exact_count_dtype(tensor))
    sums_match = row_sums.sum(dtype=torch.float64) == torch.count_nonzero(mask)
    if tensor.dtype == torch.float32:  # the range from the bits: +0.0 .. 1.0 are 0 .. 0x3F800000, in order
        low, high = torch.aminmax(tensor.view(torch.int32))
        checks.add((low >= 0) & (high <= _FLOAT32_ONE_BITS) & sums_match,
                   lambda: checks.add(_is_zero_one(tensor, mask), refuse))  # -0.0 is a 0: look closer
    else:
        low, high = torch.aminmax(tensor)
        checks.add((low >= 0) & (high <= 1) & sums_match, refuse)
    return mask, tensor.to(dtype), row_sums.to(torch.int32)


_FLOAT32_ONE_BITS = 0x3F800000


def _exact_count_dtype(tensor: Tensor) -> torch.dtype | None:
    """The dtype in which a float mask's row sums count its ones exactly: sums of 0/1 are exact below
    2^24 terms in float32 (2^53 in float64); half types sum in float32."""
    if tensor.shape[1] >= 2**24:
        return torch.float64
    return None if tensor.dtype in (torch.float32, torch.float64) else torch.float32


def _is_zero_one(tensor: Tensor, mask: Tensor) -> Tensor:
    """The float mask check of `_mask` from the values' range (0-d bool): in [0, 1], and the sum equals
    the number of non-zeros."""
    low, high = torch.aminmax(tensor)
    count = tensor.sum(dim=1, dtype=_exact_count_dtype(tensor)).sum(dtype=torch.float64)
    return (low >= 0) & (high <= 1) & (count == torch.count_nonzero(mask))


def _count_valid(mask: Tensor, dim: int = 1) -> Tensor:
    """True entries per row of a bool mask [B, T] -> [B] int32, read as bytes (no widening copy)."""
    return mask.view(torch.uint8).sum(dim=dim, dtype=torch.int32)


def _zero_masked(name: str, array: np.ndarray | Tensor, mask: Tensor, valid: Tensor, dtype: torch.dtype,
                 device: torch.device, tensors: dict[str, Tensor], checks: Checks) -> Tensor:
    """`array` in `dtype` with 0 at masked positions, checked finite on the valid ones (NaN/Inf under the
    mask are ignored). One multiply by the 0/1 mask (`valid`, in `dtype`: it also widens what `_numeric`
    left in its dtype) and one sum, whose verdict goes to `checks`; nothing converted is kept for the
    check (`array` is the request's own). Only when that sum is not finite: an exact check, and
    where NaN/Inf sit under the mask, `where` (which then replaces `tensors[name]`), both on the device:
    the closer look is read in the checks' next round. With `checks.read_later` (the request is
    computed before the verdicts are read), the verdict is whether every term is finite (exact: no
    overflow to look past), and the tensor returned is already what the closer look would make of it,
    chosen on the device: the product where every term is finite, else `where`."""
    zeroed = _numeric(name, array, dtype, device, True) * valid

    def refuse() -> None:
        raise InvalidArgument(f"tensor {name!r} has NaN or Inf on an unmasked position", field=_field(name))

    def on_fail() -> None:
        with _fits(name):
            kept = torch.where(mask, _numeric(name, array, dtype, device), 0)
        if not checks.read_later:  # the product itself when every term is finite (the sum overflowed), else
            tensors[name] = torch.where(torch.isfinite(zeroed).all(), zeroed, kept)  # NaN/Inf were masked
        checks.add(torch.isfinite(kept).all(), refuse)

    if checks.read_later:  # the closer look's choice made now: at a valid position the product is `kept`
        every_term_finite = _all_finite(zeroed)
        checks.add(every_term_finite, on_fail)
        return torch.where(mask | every_term_finite, zeroed, 0)
    checks.add(_finite_number(zeroed.sum()), on_fail)
    return zeroed


class _KernelChecks:
    """The Triton path of a request's value checks (`kernels.validate`): the mask (`_mask`) and the float
    token tensors (`_zero_masked`) checked and converted in one launch each, their verdicts the flags of
    one bool tensor on the device (one launch sets them True), added to `checks`."""

    def __init__(self, size: int, device: torch.device, checks: Checks) -> None:
        self.size, self.device, self.checks, self.flags, self.used = size, device, checks, None, 0

    def _flag(self, refuse: Callable[[], None]) -> Tensor:
        """The next flag (0-d bool, True), its check added: `refuse` raises where a kernel clears it."""
        if self.flags is None:
            self.flags = torch.ones(self.size, dtype=torch.bool, device=self.device)
        ok, self.used = self.flags[self.used], self.used + 1
        self.checks.add(ok, refuse)
        return ok

    def mask(self, given: Tensor, dtype: torch.dtype, refuse: Callable[[], None]) -> tuple[Tensor, Tensor, Tensor]:
        """`_mask`'s (bool mask, values in `dtype`, lengths) of the given mask on the device."""
        from .kernels import validate  # imports triton

        return validate.mask_of(given, dtype, self._flag(refuse))

    def zero_masked(self, name: str, array: np.ndarray | Tensor, mask: Tensor, dtype: torch.dtype) -> Tensor | None:
        """`array` in `dtype`, 0 where `mask` is False, its check added; None for an array the kernel does
        not read (integers, booleans): the torch path then."""
        from .kernels import validate  # imports triton

        tensor = _numeric_on_device(name, array, self.device)
        if tensor.dtype not in validate.FLOAT_INPUTS:
            return None

        def refuse() -> None:
            raise InvalidArgument(f"tensor {name!r} has NaN or Inf on an unmasked position", field=_field(name))

        return validate.zero_masked(tensor, mask, dtype, self._flag(refuse))


def _finite(tensor: Tensor, error: Callable[[], InvalidArgument],
            checks: Checks) -> tuple[Tensor, Callable[[], None]]:
    """A check (verdict, on_fail) that `tensor` is finite: its sum is finite when every term is; a sum
    that is not is looked at term by term in the next round (a finite sum can overflow), and `error()`
    raised only when a term is not finite."""
    def refuse() -> None:
        raise error()

    return _finite_number(tensor.sum()), lambda: checks.add(torch.isfinite(tensor).all(), refuse)


def _finite_number(number: Tensor) -> Tensor:
    """0-d bool: the 0-d `number` is finite (x − x is 0 for a finite x, NaN for ±inf and NaN): two
    kernels on a device, where `torch.isfinite` launches four."""
    return (number - number) == 0


def _all_finite(x: Tensor) -> Tensor:
    """0-d bool: every element of `x` is finite, exactly (x·0 is ±0 for a finite x, NaN otherwise, and
    a sum of zeros cannot overflow): three kernels on a device, no tensor of bools."""
    return (x * 0).sum() == 0


def _check_shapes(shapes: Mapping[str, tuple[int, ...]], allowed: Iterable[str] = ()) -> tuple[int, int]:
    """Rank and size agreement: [B] for sequence tensors, [B, T] for token tensors; B, T >= 1. A rank
    that fits another accepted tensor (`allowed`: [B, T] `rewards` for `token_rewards`) says so. B and
    T are what most tensors agree on (response_mask's on a tie), so a mismatch names the odd one out
    whatever the order the request listed the tensors in."""
    for name, shape in shapes.items():
        want = 2 if name in TOKEN_TENSORS or name in COMPONENT_TENSORS else 1
        if len(shape) != want:
            expected = "[B, K]" if name in COMPONENT_TENSORS else "[B, T]" if want == 2 else "[B]"
            other, hint = SHAPE_HINTS.get((name, len(shape)), (None, ""))
            hint = f"; {hint}" if other in allowed else ""
            raise InvalidArgument(f"tensor {name!r} must be {expected}, got shape {list(shape)}{hint}",
                                  field=_field(name))
    if not shapes:
        raise InvalidArgument("empty batch: B must be at least 1", field=_field("response_mask"))
    for name in COMPONENT_TENSORS & set(shapes):
        if shapes[name][1] == 0:
            raise InvalidArgument(f"tensor {name!r} needs at least one component: K must be at least 1",
                                  field=_field(name))
    sizes = {"B": {name: shape[0] for name, shape in shapes.items()},
             "T": {name: shape[1] for name, shape in shapes.items()
                   if len(shape) == 2 and name not in COMPONENT_TENSORS}}
    agreed = {}
    for dim, of in sizes.items():
        if not of:
            continue
        counts = collections.Counter(of.values())
        size, reference = next((v, n) for n, v in of.items() if counts[v] == max(counts.values()))
        for name, value in of.items():
            if value != size:
                raise InvalidArgument(f"tensor {name!r} has {dim} = {value} but {reference!r} has {dim} = {size}",
                                      field=_field(name))
        if size == 0:
            what = "empty batch: B" if dim == "B" else "empty responses: T"
            raise InvalidArgument(f"{what} must be at least 1", field=_field(reference))
        agreed[dim] = size
    return agreed["B"], agreed.get("T", 0)
