"""The gRPC wire contract in Python terms: conversions between the proto messages and the plain
documents of the REST API (`{"estimator", "preset", "params", ...}` with tensors as `RawTensor`s or
inline lists). The server and the client both use these, so the two transports cannot drift: a gRPC
request becomes exactly the document a REST client would have sent.
"""

from __future__ import annotations

from typing import Any, Mapping

from google.protobuf import json_format

from ._pb import advserve_pb2 as pb
from .framing import ITEMSIZE, OUTPUTS_KEY, FramingError, RawTensor, RegionRef, outputs_target, region_ref

ESTIMATORS = ("reinforce", "reinforce_rtg", "reinforce_pp", "reinforce_pp_baseline", "rloo", "remax", "gae", "orz",
              "grpo", "grpo_original", "dapo", "dr_grpo", "flash_reinforce", "grpo_passk", "opo", "gpg", "gdpo",
              "optimal_token_baseline", "tir_optimal_token_baseline")
DTYPE_NAMES = {pb.DATA_TYPE_FLOAT32: "float32", pb.DATA_TYPE_FLOAT64: "float64", pb.DATA_TYPE_FLOAT16: "float16",
               pb.DATA_TYPE_BFLOAT16: "bfloat16", pb.DATA_TYPE_INT32: "int32", pb.DATA_TYPE_INT64: "int64",
               pb.DATA_TYPE_UINT8: "uint8", pb.DATA_TYPE_BOOL: "bool"}
DTYPE_ENUMS = {name: value for value, name in DTYPE_NAMES.items()}
ADVANTAGE_TENSORS = ("rewards", "token_rewards", "response_mask", "group_ids", "values", "old_logprobs", "ref_logprobs",
                     "greedy_rewards", "cu_seqlens", "sum_pi_squared", "rollout_is_weights", "reward_components")
LOSS_TENSORS = ("logprobs", "old_logprobs", "advantages", "response_mask", "ref_logprobs", "values", "old_values",
                "returns", "entropy", "rollout_logprobs", "cu_seqlens", "token_losses", "rollout_is_weights")
LOSS_TERMS = ("policy_loss", "kl_loss", "value_loss", "entropy_bonus", "rollout_correction", "token_loss")
LOSS_OUTPUTS = ("grad_logprobs", "grad_values", "grad_entropy", "grad_token_losses", "kl_values")
LOSS_COMPONENTS = ("policy", "kl", "value", "entropy", "token_loss")

# enum <-> REST name, per enum: the enum value's name without its prefix, lower-cased
_ENUMS = {
    "estimator": (pb.Estimator, "ESTIMATOR_"),
    "preset": (pb.Preset, "PRESET_"),
    "layout": (pb.Layout, "LAYOUT_"),
    "kl_estimator": (pb.KLEstimator, "KL_ESTIMATOR_"),
    "kl_placement": (pb.KLPlacement, "KL_PLACEMENT_"),
    "singleton_groups": (pb.SingletonGroups, "SINGLETON_GROUPS_"),
    "mask_gaps": (pb.MaskGaps, "MASK_GAPS_"),
    "std_scope": (pb.StdScope, "STD_SCOPE_"),
    "whiten_eps_mode": (pb.WhitenEpsMode, "WHITEN_EPS_MODE_"),
    "whiten_scope": (pb.WhitenScope, "WHITEN_SCOPE_"),
    "masked_token_rewards": (pb.MaskedTokenRewards, "MASKED_TOKEN_REWARDS_"),
    "mode": (pb.PolicyLossMode, "POLICY_LOSS_MODE_"),
    "agg": (pb.Aggregation, "AGGREGATION_"),
    "estimator_kl": (pb.KLEstimator, "KL_ESTIMATOR_"),
    "level": (pb.RolloutCorrection.Level, "LEVEL_"),
    "rc_mode": (pb.RolloutCorrection.Mode, "MODE_"),
    "gating": (pb.RolloutCorrection.Gating, "GATING_"),
    "weight": (pb.RolloutCorrection.Weight, "WEIGHT_"),
    "cispo_level": (pb.CispoLevel, "CISPO_LEVEL_"),
    "sequence_ratio_gradient": (pb.SequenceRatioGradient, "SEQUENCE_RATIO_GRADIENT_"),
    "seq_denominator": (pb.SeqDenominator, "SEQ_DENOMINATOR_"),
    "clip_ties": (pb.ClipTies, "CLIP_TIES_"),
    "clip_form": (pb.ValueClipForm, "VALUE_CLIP_FORM_"),
    "gradient_estimator": (pb.KLEstimator, "KL_ESTIMATOR_"),
    "bypass_loss": (pb.BypassLoss, "BYPASS_LOSS_"),
    "bypass_is": (pb.BypassIs, "BYPASS_IS_"),
    "bias": (pb.Bias, "BIAS_"),
}
# integer parameters carried in a double field, so that the server checks them as it does over REST
# (a non-integer is its error, reported in the order of its other checks); read back as ints
INTEGER_DOUBLES = frozenset({"clip_cov_seed"})
# nullable parameters: message field -> the bool field that means "null" (off)
_NULLABLE = {"kl_clamp": "no_kl_clamp", "dual_clip": "no_dual_clip", "ratio_clamp": "no_ratio_clamp",
             "clamp": "no_clamp", "clip": "no_clip", "loss_scale_factor": "no_loss_scale_factor",
             "ratio_cap": "no_ratio_cap", "cispo_cap": "no_cispo_cap", "agg": "no_agg", "low": "no_low",
             "high": "no_high", "log_clamp": "no_log_clamp", "reward_clip_low": "no_reward_clip_low",
             "reward_clip_high": "no_reward_clip_high", "reward_weights": "no_reward_weights",
             "seq_denominator": "no_seq_denominator",
             "gradient_estimator": "no_gradient_estimator", "dro_beta": "no_dro_beta", "bypass_is": "no_bypass_is",
             "bypass_is_low": "no_bypass_is_low"}


def _enum_kind(message: Any, field: str) -> str:
    if field == "estimator" and isinstance(message, pb.KLLoss):
        return "estimator_kl"
    if field == "mode" and isinstance(message, pb.RolloutCorrection):
        return "rc_mode"
    return field


def enum_to_name(kind: str, value: int) -> str | None:
    """REST name of an enum value; None for UNSPECIFIED."""
    enum, prefix = _ENUMS[kind]
    name = enum.Name(value)
    if name.endswith("_UNSPECIFIED"):
        return None
    name = name[len(prefix):].lower()
    return name.replace("_", "-") if kind == "agg" else name  # aggregation modes are hyphenated


def name_to_enum(kind: str, name: str | None) -> int:
    """Enum value of a REST name, exactly as REST spells it (0 for None); ValueError otherwise."""
    if name is None:
        return 0
    enum, _ = _ENUMS[kind]
    names = {enum_to_name(kind, v): v for v in enum.values()}
    names.pop(None, None)
    if name not in names:
        label = {"estimator_kl": "estimator", "rc_mode": "mode"}.get(kind, kind)
        raise ValueError(f"{label} must be one of {', '.join(names)}, got {name!r}")
    return names[name]


# --- tensors ------------------------------------------------------------------------------------


def tensor_to_pb(raw: RawTensor | RegionRef) -> pb.Tensor:
    if isinstance(raw, RegionRef):
        return pb.Tensor(dtype=DTYPE_ENUMS[raw.dtype], shape=list(raw.shape), shared_memory=region_to_pb(
            raw.region, raw.offset, raw.byte_size))
    return pb.Tensor(dtype=DTYPE_ENUMS[raw.dtype], shape=list(raw.shape), data=bytes(raw.data))


def region_to_pb(region: str, offset: int, byte_size: int) -> pb.SharedMemoryRef:
    return pb.SharedMemoryRef(region=region, offset=offset, byte_size=byte_size)


def tensor_from_pb(name: str, message: pb.Tensor) -> RawTensor | RegionRef:
    """A RawTensor viewing the message's bytes, or the RegionRef of a tensor held in a shared-memory
    region; the sizes are checked as in the binary framing."""
    field = f"tensors.{name}"
    dtype = DTYPE_NAMES.get(message.dtype)
    if dtype is None:
        raise FramingError(f"tensor {name!r}: dtype must be set to one of {', '.join(DTYPE_ENUMS)}", field)
    if message.HasField("shared_memory"):
        if message.data:
            raise FramingError(f"tensor {name!r}: give either data or shared_memory, not both", field)
        ref = message.shared_memory
        return region_ref(name, {"dtype": dtype, "shape": list(message.shape), "shared_memory_region": ref.region,
                                 "shared_memory_offset": ref.offset, "shared_memory_byte_size": ref.byte_size})
    shape = tuple(message.shape)
    if any(d < 0 for d in shape):
        raise FramingError(f"tensor {name!r}: shape must be non-negative, got {list(shape)}", field)
    count = 1
    for d in shape:
        count *= d
    if count * ITEMSIZE[dtype] != len(message.data):
        raise FramingError(f"tensor {name!r}: {len(message.data)} bytes of data but shape {list(shape)} of {dtype} "
                           f"needs {count * ITEMSIZE[dtype]}", field)
    return RawTensor(dtype, shape, memoryview(message.data))


def _tensors_to_pb(message: Any, tensors: Mapping[str, Any]) -> None:
    for name, value in tensors.items():
        if value is None:
            continue
        if name == "group_ids":
            if isinstance(value, (RawTensor, RegionRef)):
                message.group_ids.numeric.CopyFrom(tensor_to_pb(value))
            else:
                message.group_ids.strings.values.extend(str(v) for v in value)
        else:
            getattr(message, name).CopyFrom(tensor_to_pb(value))


def _tensors_from_pb(message: Any, names: tuple[str, ...]) -> dict[str, Any]:
    tensors: dict[str, Any] = {}
    for name in names:
        if not message.HasField(name):
            continue
        if name == "group_ids":
            ids = message.group_ids
            if ids.HasField("numeric"):
                tensors[name] = tensor_from_pb(name, ids.numeric)
            else:
                tensors[name] = list(ids.strings.values)
        else:
            tensors[name] = tensor_from_pb(name, getattr(message, name))
    return tensors


# --- parameter messages <-> dicts ---------------------------------------------------------------


def is_repeated_field(field: Any) -> bool:
    """A repeated field (protobuf 7 has is_repeated and no label; 5 and 6 have label)."""
    return field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED


def params_to_pb(message: Any, params: Mapping[str, Any] | None) -> Any:
    """Fill a parameter message (AdvantageParams, PolicyLoss, ...) from a REST-style dict.

    None values of nullable parameters set the matching no_* field. Unknown names raise ValueError.
    """
    for name, value in (params or {}).items():
        if name not in message.DESCRIPTOR.fields_by_name:
            valid = ", ".join(f.name for f in message.DESCRIPTOR.fields if not f.name.startswith("no_"))
            raise ValueError(f"{message.DESCRIPTOR.name} has no parameter {name!r}; valid: {valid}")
        field = message.DESCRIPTOR.fields_by_name[name]
        if is_repeated_field(field):  # a list parameter (gdpo's reward_weights): empty is null
            if value is None:
                setattr(message, _NULLABLE[name], True)
            else:
                getattr(message, name).extend(value)
        elif value is None:
            if _NULLABLE.get(name) in message.DESCRIPTOR.fields_by_name:
                setattr(message, _NULLABLE[name], True)
            elif not field.has_presence:
                raise ValueError(f"{name} cannot be null")
            # else: an optional field whose null is its unset state
        elif field.enum_type is not None:
            setattr(message, name, name_to_enum(_enum_kind(message, name), value))
        else:
            setattr(message, name, value)
    return message


def params_from_pb(message: Any) -> dict[str, Any]:
    """The REST-style dict of the parameters set in `message` (a no_* field gives None; an unset field
    is absent: in a request, the preset's default; in a response, a parameter the server left out,
    e.g. one the policy loss's mode does not read)."""
    out: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        name = field.name
        if name.startswith("no_"):
            continue
        if field.enum_type is not None:
            value = getattr(message, name)
            if value:
                out[name] = enum_to_name(_enum_kind(message, name), value)
        elif is_repeated_field(field):
            if len(getattr(message, name)):
                out[name] = list(getattr(message, name))
        elif message.HasField(name):
            value = getattr(message, name)
            out[name] = int(value) if name in INTEGER_DOUBLES and float(value).is_integer() else value
    for name, flag in _NULLABLE.items():
        if flag in message.DESCRIPTOR.fields_by_name and getattr(message, flag) and name not in out:
            out[name] = None
    return out


# --- requests -----------------------------------------------------------------------------------


def advantages_request_to_pb(document: Mapping[str, Any], tensors: Mapping[str, Any]) -> pb.ComputeAdvantagesRequest:
    """From the REST document ({"estimator", "preset", "params", "dtype", "layout"}) and its tensors
    (RawTensor, or a list for string group ids)."""
    request = pb.ComputeAdvantagesRequest(
        estimator=name_to_enum("estimator", document.get("estimator")),
        preset=name_to_enum("preset", document.get("preset")),
        dtype=DTYPE_ENUMS[document["dtype"]] if document.get("dtype") else 0,
        layout=name_to_enum("layout", document.get("layout")),
    )
    params_to_pb(request.params, document.get("params"))
    _tensors_to_pb(request, tensors)
    _outputs_to_pb(request, document)
    return request


def _outputs_to_pb(request: Any, document: Mapping[str, Any]) -> None:
    """The document's "shared_memory_outputs" (checked, FramingError naming it) as output_shared_memory."""
    if document.get(OUTPUTS_KEY) is not None:
        request.output_shared_memory.CopyFrom(region_to_pb(*outputs_target(document[OUTPUTS_KEY])))


def _outputs_from_pb(request: Any, document: dict[str, Any]) -> None:
    """output_shared_memory, when set, as the document's "shared_memory_outputs"."""
    if request.HasField("output_shared_memory"):
        target = request.output_shared_memory
        document[OUTPUTS_KEY] = {"region": target.region, "offset": target.offset, "byte_size": target.byte_size}


def advantages_request_from_pb(request: pb.ComputeAdvantagesRequest) -> tuple[dict[str, Any], dict[str, Any]]:
    document: dict[str, Any] = {"estimator": enum_to_name("estimator", request.estimator)}
    if document["estimator"] is None:
        raise FramingError("estimator must be set", "estimator")
    for key, value in (("preset", enum_to_name("preset", request.preset)),
                       ("dtype", DTYPE_NAMES.get(request.dtype)),
                       ("layout", enum_to_name("layout", request.layout))):
        if value is not None:
            document[key] = value
    if request.HasField("params"):
        document["params"] = params_from_pb(request.params)
    _outputs_from_pb(request, document)
    return document, _tensors_from_pb(request, ADVANTAGE_TENSORS)


def losses_request_to_pb(document: Mapping[str, Any], tensors: Mapping[str, Any]) -> pb.ComputeLossesRequest:
    request = pb.ComputeLossesRequest(
        preset=name_to_enum("preset", document.get("preset")),
        dtype=DTYPE_ENUMS[document["dtype"]] if document.get("dtype") else 0,
        layout=name_to_enum("layout", document.get("layout")),
    )
    for term in LOSS_TERMS:
        spec = document.get(term)
        if term == "policy_loss" and spec is False:
            request.disable_policy_loss = True
        elif spec is not None and spec is not False:
            getattr(request, term).SetInParent()
            params_to_pb(getattr(request, term), spec if isinstance(spec, Mapping) else None)
    for key in ("num_tokens", "num_sequences", "dp_size", "return_kl_values"):
        if document.get(key) is not None:
            setattr(request, key, document[key])
    _tensors_to_pb(request, tensors)
    _outputs_to_pb(request, document)
    return request


def losses_request_from_pb(request: pb.ComputeLossesRequest) -> tuple[dict[str, Any], dict[str, Any]]:
    document: dict[str, Any] = {}
    for key, value in (("preset", enum_to_name("preset", request.preset)),
                       ("dtype", DTYPE_NAMES.get(request.dtype)),
                       ("layout", enum_to_name("layout", request.layout))):
        if value is not None:
            document[key] = value
    for term in LOSS_TERMS:
        if request.HasField(term):
            document[term] = params_from_pb(getattr(request, term))
    if request.disable_policy_loss:
        document["policy_loss"] = False
    for key in ("num_tokens", "num_sequences", "dp_size", "return_kl_values"):
        if request.HasField(key):
            document[key] = getattr(request, key)
    _outputs_from_pb(request, document)
    return document, _tensors_from_pb(request, LOSS_TENSORS)


# --- responses ----------------------------------------------------------------------------------


def _moments(values: Mapping[str, float] | None) -> pb.Moments:
    return pb.Moments(**{k: v for k, v in (values or {}).items() if k in ("mean", "std", "min", "max")})


def advantages_response_to_pb(document: Mapping[str, Any], tensors: Mapping[str, RawTensor | RegionRef],
                              ) -> pb.ComputeAdvantagesResponse:
    stats = document.get("stats") or {}
    response = pb.ComputeAdvantagesResponse(
        advantages=tensor_to_pb(tensors["advantages"]), returns=tensor_to_pb(tensors["returns"]),
        stats=pb.AdvantageStats(sequences=stats.get("sequences", 0), tokens=stats.get("tokens", 0),
                                advantages=_moments(stats.get("advantages")), rewards=_moments(stats.get("rewards"))))
    groups = stats.get("groups")
    if groups:
        response.stats.groups.CopyFrom(pb.GroupStats(
            count=groups["count"], size_min=groups["size_min"], size_max=groups["size_max"],
            zero_variance_fraction=groups["zero_variance_fraction"], ids=[str(i) for i in groups["ids"]],
            reward_mean=groups["reward_mean"]))
    params_to_pb(response.params, document.get("params"))
    return response


def advantages_response_from_pb(response: pb.ComputeAdvantagesResponse) -> tuple[dict[str, Any], dict[str, RawTensor]]:
    stats = json_format.MessageToDict(response.stats, preserving_proto_field_name=True,
                                      always_print_fields_with_no_presence=True)
    stats["rewards"] = {k: v for k, v in stats.get("rewards", {}).items() if k in ("mean", "std")}  # as REST
    for key in ("sequences", "tokens"):
        stats[key] = int(stats.get(key, 0))
    groups = stats.get("groups")
    if groups is not None and response.stats.HasField("groups"):
        for key in ("count", "size_min", "size_max"):
            groups[key] = int(groups.get(key, 0))
    else:
        stats.pop("groups", None)
    document = {"params": params_from_pb(response.params), "stats": stats}
    tensors = {name: tensor_from_pb(name, getattr(response, name)) for name in ("advantages", "returns")}
    return document, tensors


def losses_response_to_pb(document: Mapping[str, Any], tensors: Mapping[str, RawTensor | RegionRef | None],
                          ) -> pb.ComputeLossesResponse:
    response = pb.ComputeLossesResponse(loss=document["loss"], metrics=document.get("metrics") or {})
    for name, value in (document.get("components") or {}).items():
        if value is not None:
            setattr(response.components, name, value)
    for name, raw in tensors.items():
        if raw is not None:
            getattr(response, name).CopyFrom(tensor_to_pb(raw))
    for term, params in (document.get("params") or {}).items():
        getattr(response, term).SetInParent()
        params_to_pb(getattr(response, term), params)
    return response


def losses_response_from_pb(response: pb.ComputeLossesResponse) -> tuple[dict[str, Any], dict[str, RawTensor | None]]:
    components = {name: (getattr(response.components, name) if response.components.HasField(name) else None)
                  for name in LOSS_COMPONENTS}
    params = {term: params_from_pb(getattr(response, term)) for term in LOSS_TERMS
              if response.HasField(term)}
    document = {"loss": response.loss, "components": components, "metrics": dict(response.metrics), "params": params}
    tensors = {name: (tensor_from_pb(name, getattr(response, name)) if response.HasField(name) else None)
               for name in LOSS_OUTPUTS}
    return document, tensors


# --- analysis -----------------------------------------------------------------------------------

SUMMARY_KEYS = ("min", "median", "max", "mean", "token_weighted_mean", "max_over_min")
_GROUP_FLOATS = ("pass_rate", "reward_std", "mean_length", "harmonic_mean_length")


def analyze_request_to_pb(document: Mapping[str, Any], tensors: Mapping[str, Any]) -> pb.AnalyzeRequest:
    """From the REST document ({"estimators", "preset", "params": {estimator: {...}}, "dtype", "layout"})."""
    request = pb.AnalyzeRequest(
        estimators=[name_to_enum("estimator", name) for name in document.get("estimators") or ()],
        preset=name_to_enum("preset", document.get("preset")),
        dtype=DTYPE_ENUMS[document["dtype"]] if document.get("dtype") else 0,
        layout=name_to_enum("layout", document.get("layout")),
    )
    for estimator, overrides in (document.get("params") or {}).items():
        params_to_pb(request.params[estimator], overrides)
    _tensors_to_pb(request, tensors)
    return request


def analyze_request_from_pb(request: pb.AnalyzeRequest) -> tuple[dict[str, Any], dict[str, Any]]:
    document: dict[str, Any] = {}
    if request.estimators:
        names = [enum_to_name("estimator", value) for value in request.estimators]
        if None in names:
            raise FramingError("estimators: ESTIMATOR_UNSPECIFIED is not an estimator", "estimators")
        document["estimators"] = names
    for key, value in (("preset", enum_to_name("preset", request.preset)),
                       ("dtype", DTYPE_NAMES.get(request.dtype)),
                       ("layout", enum_to_name("layout", request.layout))):
        if value is not None:
            document[key] = value
    if request.params:
        document["params"] = {name: params_from_pb(message) for name, message in request.params.items()}
    return document, _tensors_from_pb(request, ADVANTAGE_TENSORS)


def _doubles(values: Any) -> pb.DoubleList | None:
    return None if values is None else pb.DoubleList(values=values)


def analyze_response_to_pb(document: Mapping[str, Any]) -> pb.AnalyzeResponse:
    """From the REST document of POST /v1/analysis."""
    groups = document["groups"]
    response = pb.AnalyzeResponse(
        preset=name_to_enum("preset", document["preset"]), sequences=document["sequences"],
        tokens=document["tokens"], binary_rewards=document["binary_rewards"],
        groups=pb.GroupAnalysis(count=groups["count"], ids=groups["ids"], size=groups["size"],
                                tokens=groups["tokens"], no_signal=groups["no_signal"],
                                **{key: groups[key] for key in _GROUP_FLOATS}),
        no_signal_fraction=document["no_signal_fraction"], no_signal_token_fraction=document["no_signal_token_fraction"],
        sign_disagreement=[v for row in document["sign_disagreement"] for v in row],
        sign_opposition=[v for row in document["sign_opposition"] for v in row],
    )
    for name in document["estimators"]:
        entry = document["analysis"][name]
        item = response.estimators.add(
            estimator=name_to_enum("estimator", name), bias=name_to_enum("bias", entry["bias"]),
            formula=entry["formula"], weights=entry["weights"], zero_advantage_fraction=entry["zero_advantage_fraction"],
            summary=pb.WeightSummary(**{k: v for k, v in entry["summary"].items() if v is not None}))
        if entry["whitening_scale"] is not None:
            item.whitening_scale = entry["whitening_scale"]
        for key in ("weights_exact", "relative_to_median"):
            if entry[key] is not None:
                getattr(item, key).CopyFrom(_doubles(entry[key]))
        params_to_pb(item.params, entry["params"])
    return response


def analyze_response_from_pb(response: pb.AnalyzeResponse) -> dict[str, Any]:
    """The REST document of POST /v1/analysis (group ids as strings, as REST gives them)."""
    names = [enum_to_name("estimator", item.estimator) for item in response.estimators]
    count = len(names)

    def square(values: Any) -> list[list[float]]:
        flat = list(values)
        return [flat[i * count:(i + 1) * count] for i in range(count)]

    groups = response.groups
    analysis = {}
    for name, item in zip(names, response.estimators):
        analysis[name] = {
            "bias": enum_to_name("bias", item.bias),
            "formula": item.formula,
            "params": params_from_pb(item.params),
            "whitening_scale": item.whitening_scale if item.HasField("whitening_scale") else None,
            "weights": list(item.weights),
            "weights_exact": list(item.weights_exact.values) if item.HasField("weights_exact") else None,
            "relative_to_median": list(item.relative_to_median.values) if item.HasField("relative_to_median") else None,
            "zero_advantage_fraction": item.zero_advantage_fraction,
            "summary": {key: (getattr(item.summary, key) if item.summary.HasField(key) else None)
                        for key in SUMMARY_KEYS},
        }
    return {
        "preset": enum_to_name("preset", response.preset),
        "estimators": names,
        "sequences": response.sequences,
        "tokens": response.tokens,
        "binary_rewards": response.binary_rewards,
        "groups": {"count": groups.count, "ids": list(groups.ids), "size": list(groups.size),
                   **{key: list(getattr(groups, key)) for key in _GROUP_FLOATS},
                   "tokens": list(groups.tokens), "no_signal": list(groups.no_signal)},
        "no_signal_fraction": response.no_signal_fraction,
        "no_signal_token_fraction": response.no_signal_token_fraction,
        "analysis": analysis,
        "sign_disagreement": square(response.sign_disagreement),
        "sign_opposition": square(response.sign_opposition),
    }
