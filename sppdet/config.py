"""Configuration: frozen dataclasses per stage (:mod:`sppdet.config_sections`), strict YAML loading, fingerprints.

``load_config(path, overrides)`` reads a YAML file whose top-level keys are the sections
below; an unknown key or a value of the wrong type is an error naming it (as
py-faster-rcnn's ``_merge_a_into_b``, without its mutable global). Overrides are
``"section.key=value"`` strings parsed as YAML scalars. Every stage writes the resolved
section(s) it used and their :func:`fingerprint` into its output folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "Config",
    "with_device",
    "DataConfig",
    "ProposalConfig",
    "BackboneConfig",
    "PretrainConfig",
    "FeatureConfig",
    "FinetuneConfig",
    "SVMConfig",
    "BBoxRegConfig",
    "TestConfig",
    "FastRCNNConfig",
    "RCNNConfig",
    "ConfigError",
    "load_config",
    "fingerprint",
    "to_dict",
    "resolve_path",
]


from .config_sections import (COMBINABLE, DEVICE_PATTERN, PRECISIONS, BBoxRegConfig, BackboneConfig,  # noqa: F401 (re-exported)
                              ConfigError, DataConfig, FastRCNNConfig, FeatureConfig, FinetuneConfig, PretrainConfig,
                              ProposalConfig, RCNNConfig, SVMConfig, TestConfig, positive_ints)


@dataclass(frozen=True)
class Config:
    name: str = "experiment"
    seed: int = 0
    run_dir: str = "runs/experiment"
    # The folder relative paths of this config (data.root, run_dir, pretrain.root, file weights, precomputed
    # proposals) are resolved against, whatever the current directory: set by load_config to the project root
    # for a config in a configs/ folder, kept as saved in a run folder's config.yaml; "" = the current directory.
    base_dir: str = ""
    # What tools/demo.py trains and Predictor / tools/detect.py serve. spp: the SPP-net stages (conv5 cache, fc layers
    # fine-tuned with conv frozen, SVMs, box regressors); fast_rcnn: Fast R-CNN mode (section fast_rcnn: the conv
    # layers above the stem and the head trained in one stage, softmax scores and its own box regression, no cache).
    route: str = field(default="spp", metadata={"choices": ("spp", "fast_rcnn")})
    # Where the networks run: the conv pass (pre-training, the conv5 cache), fine-tuning, and the fc layers of the SVM
    # and test stages; the windows are pooled from conv5 there too (the maps are loaded onto the device: the same
    # values, bit for bit). cpu, cuda, cuda:N, or auto (CUDA when torch finds it, else the CPU). Proposals, the SVM
    # solver and box regression run on the CPU. Not in any stage's fingerprint: a stage made on one device is
    # reused on another (the precisions that `auto` resolves to per device are recorded and checked).
    device: str = "cpu"
    data: DataConfig = field(default_factory=DataConfig)
    proposals: ProposalConfig = field(default_factory=ProposalConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    svm: SVMConfig = field(default_factory=SVMConfig)
    bbox_reg: BBoxRegConfig = field(default_factory=BBoxRegConfig)
    test: TestConfig = field(default_factory=TestConfig)
    fast_rcnn: FastRCNNConfig = field(default_factory=FastRCNNConfig)
    rcnn: RCNNConfig = field(default_factory=RCNNConfig)

    def __post_init__(self):
        if not re.fullmatch(DEVICE_PATTERN, self.device):
            raise ConfigError(f"device: must be cpu, cuda, cuda:N or auto, got {self.device!r}")
        # test.combine's SVM sets share the detector's one fc head, the fine-tuned one.
        for f in self.test.combine:
            if f not in COMBINABLE:
                raise ConfigError(f"test.combine: {f!r} is not pool5, fc6 or fc7 (of the fine-tuned head)")
            if f == self.svm.feature:
                raise ConfigError(f"test.combine: {f!r} is svm.feature already")
        if self.backbone.hypercolumn and not self.backbone.name.startswith("efficientnet_lite"):
            raise ConfigError(f"backbone.hypercolumn is for the EfficientNet-Lite trunks, not {self.backbone.name}")
        if self.backbone.hypercolumn and self.backbone.stride != 16:
            raise ConfigError(f"backbone.hypercolumn stacks the stride-32 map on the stride-16 grid; it needs "
                              f"backbone.stride 16, not {self.backbone.stride}")
        if self.features.deep_levels is not None and not self.backbone.hypercolumn:
            raise ConfigError("features.deep_levels is the pyramid of a hypercolumn's stride-32 channels; it needs "
                              "backbone.hypercolumn: true (or leave it null)")
        if self.backbone.project is not None and self.backbone.project < 1:
            raise ConfigError(f"backbone.project: conv5's channels kept (>= 1) or null, not {self.backbone.project}")
        if self.backbone.project is not None and self.features.deep_levels is not None:
            raise ConfigError("features.deep_levels pools a hypercolumn's stride-32 channels apart, which "
                              "backbone.project mixes with the others; set one of them to null")
        if self.finetune.input_norm < 0:
            raise ConfigError(f"finetune.input_norm must be >= 0 (0: features as they are), got {self.finetune.input_norm}")
        if self.finetune.input_norm and self.finetune.init_from_pretrain:
            raise ConfigError("finetune.input_norm rescales fc6's input, which the pre-trained classifier's fc6 was not "
                              "trained on; set finetune.init_from_pretrain: false with it")
        if self.finetune.fc6_rank and self.finetune.init_from_pretrain:
            raise ConfigError("finetune.fc6_rank learns fc6 factored from random initialisation; the pre-trained "
                              "classifier's fc6 is a full layer: set finetune.init_from_pretrain: false with it")
        if self.finetune.fc6_rank and (self.test.svd_fc6 or self.svm.feature.endswith("_noft")):
            raise ConfigError("finetune.fc6_rank: fc6 is already factored; test.svd_fc6 must be 0 and svm.feature "
                              "the fine-tuned head's")
        if self.bbox_reg.source == "finetune" and not (self.finetune.bbox_loss and self.route == "spp"
                                                       and not self.svm.feature.endswith("_noft")):
            raise ConfigError("bbox_reg.source: finetune regresses with the fine-tuned head's box layer: it needs "
                              "finetune.bbox_loss > 0, route: spp and svm.feature of the fine-tuned head")
        if self.proposals.backend != "precomputed":  # the backend's own parameters, by name and type
            from .proposals import resolved_params

            try:
                resolved_params(self.proposals.backend, self.proposals.params)
            except ValueError as e:
                raise ConfigError(f"proposals.params: {e}") from None
        if self.test.combine and self.svm.feature not in COMBINABLE:
            raise ConfigError(f"test.combine needs svm.feature pool5, fc6 or fc7 (one fc head per detector), "
                              f"got {self.svm.feature!r}")


def with_device(cfg: Config, device: str) -> Config:
    """``cfg`` with another ``device`` (one call's ``--device``, checked as the key is, the error naming the flag)."""
    try:
        return dataclasses.replace(cfg, device=device)
    except ConfigError as e:
        raise ConfigError(f"--device {device}: {str(e).removeprefix('device: ')}") from None


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp in (list, dict, str, bool):
        return isinstance(value, tp)
    return True


def _build(cls, data: dict, where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    names = set(fields)
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where or 'top level'}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(names))}")
    kwargs = {}
    for k, v in data.items():
        tp = hints[k]
        key = f"{where}.{k}" if where else k
        if dataclasses.is_dataclass(tp):
            kwargs[k] = _build(tp, v, key)
        else:
            if not _type_ok(v, tp):
                raise ConfigError(f"{key}: expected {getattr(tp, '__name__', tp)}, got {v!r} ({type(v).__name__})")
            _check(v, fields[k].metadata, key)
            kwargs[k] = float(v) if tp is float else v
    return cls(**kwargs)


def _check(v: Any, meta: dict, key: str) -> None:
    """The value constraints a field's metadata states: ``choices``, ``min`` (of a number or of each list item),
    ``items`` (the type of a list's items), ``nonempty``; ``words``: the strings a list-valued key also takes."""
    if isinstance(v, str) and "words" in meta:  # a list-valued key that also takes a word (features.scales: auto)
        if v not in meta["words"]:
            raise ConfigError(f"{key}: a list or one of {', '.join(map(repr, meta['words']))}, got {v!r}")
        return
    choices = meta.get("choices")
    if choices is not None and v not in choices:
        raise ConfigError(f"{key}: must be one of {', '.join(map(repr, choices))}, got {v!r}")
    items = v if isinstance(v, list) else [v]
    if isinstance(v, list):
        if meta.get("nonempty") and not v:
            raise ConfigError(f"{key}: must not be empty")
        tp = meta.get("items")
        if tp is not None and not all(_type_ok(x, tp) for x in v):
            raise ConfigError(f"{key}: every item must be a{'n' if tp is int else ''} {tp.__name__}, got {v!r}")
    lo = meta.get("min")
    if lo is not None and any(isinstance(x, (int, float)) and not isinstance(x, bool) and x < lo for x in items):
        raise ConfigError(f"{key}: must be >= {lo}" + (" (each item)" if isinstance(v, list) else "") + f", got {v!r}")
    hi = meta.get("max")
    if hi is not None and any(isinstance(x, (int, float)) and not isinstance(x, bool) and x > hi for x in items):
        raise ConfigError(f"{key}: must be <= {hi}" + (" (each item)" if isinstance(v, list) else "") + f", got {v!r}")


def _set_path(d: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise ConfigError(f"override {dotted!r}: {p} is not a section")
    d[parts[-1]] = value


def resolve_path(cfg: "Config", p: str | Path) -> Path:
    """A path of the config: absolute as it is, relative against ``cfg.base_dir`` (see :class:`Config`)."""
    p = Path(p)
    return p if p.is_absolute() or not cfg.base_dir else Path(cfg.base_dir) / p


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config strictly; ``overrides`` are ``"section.key=value"`` strings."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from e
    if path is not None and "base_dir" not in data and path.resolve().parent.name == "configs":
        data["base_dir"] = str(path.resolve().parent.parent)  # the project root: configs/../
    try:
        cfg = _build(Config, data, "")
    except ConfigError as e:
        raise ConfigError(f"{path or '<config>'}: {e}") from None
    if not overrides:
        return cfg
    keys = []
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"--set {ov!r} must look like section.key=value")
        k, v = ov.split("=", 1)
        keys.append(k.strip())
        try:
            _set_path(data, k.strip(), yaml.safe_load(v))
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {ov}: not a valid YAML value ({e})") from None
        except ConfigError as e:
            raise ConfigError(f"--set {e}") from None
    try:
        return _build(Config, data, "")
    except ConfigError as e:  # the file alone was valid: name the --set(s) the error is about
        msg = str(e)

        def about(key: str) -> bool:  # "section.key: ..." or "top level: unknown key(s) section"
            return msg.startswith(key) or (msg.startswith("top level") and key.split(".")[0] in msg)

        blame = [ov for ov, k in zip(overrides, keys) if about(k)] or list(overrides)
        raise ConfigError(" ".join(f"--set {ov}" for ov in blame) + f": {msg}") from None


def fingerprint(obj: Any) -> str:
    """Stable 16-hex-digit hash of a config section (dataclass) or JSON-able object."""
    if dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def diff_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k, "<missing>"), b.get(k, "<missing>")
        key = f"{prefix}{k}"
        if isinstance(va, dict) and isinstance(vb, dict):
            out += diff_keys(va, vb, key + ".")
        elif va != vb:
            out.append(f"{key}: {va!r} -> {vb!r}")
    return out


def _recorded_fields(section: Any) -> list:
    """A config section's fields that stages record: all but those marked ``record: False`` (settings that only
    resolve another one, as ``features.auto_*`` resolve ``features.scales: auto`` when the run is made: the outputs
    depend on the scale chosen, not on how)."""
    return [f for f in dataclasses.fields(section) if f.metadata.get("record") is not False]


def recorded(section: Any, omit: tuple[str, ...] = ()) -> dict:
    """A config section's values as a stage records them: ``asdict`` of its :func:`_recorded_fields`, less the
    fields named in ``omit`` (those the stage's outputs do not depend on)."""
    keep = {f.name for f in _recorded_fields(section)} - set(omit)
    return {k: v for k, v in dataclasses.asdict(section).items() if k in keep}


def without_keys(d: dict, dotted: tuple[str, ...] | list[str]) -> dict:
    """``d`` (nested) without the ``dotted`` keys (``"features.levels"``); the others untouched."""
    out = dict(d)
    for key in dotted:
        head, _, rest = key.partition(".")
        if rest and isinstance(out.get(head), dict):
            out[head] = without_keys(out[head], [rest])
        elif not rest:
            out.pop(head, None)
    return out


def section_defaults(section: Any, omit: tuple[str, ...] = ()) -> dict:
    """What each field of a config section (a dataclass or its class) was, as JSON would store it, in a manifest
    written before the field existed: its ``before`` metadata where adding the option changed what the code did
    (e.g. ``svm.tol``: solved to 1e-4 before), else its default; fields without a default are left out."""
    out = {}
    for f in _recorded_fields(section):
        if f.name in omit:
            continue
        if "before" in f.metadata:
            out[f.name] = f.metadata["before"]
        elif f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return json.loads(json.dumps(out, default=str))


def with_defaults(saved: dict, defaults: dict) -> dict:
    """``saved`` with every key it lacks taken from ``defaults`` (nested dicts alike): an option added
    after ``saved`` was written, left at its default, behaves as before it existed."""
    out = dict(saved)
    for k, v in defaults.items():
        if k not in out:
            out[k] = v
        elif isinstance(out[k], dict) and isinstance(v, dict):
            out[k] = with_defaults(out[k], v)
    return out


def section_changes(saved: dict | None, section: Any, prefix: str = "") -> list[str]:
    """``diff_keys`` between a config section saved by an earlier run and the current one, where a
    field the saved dict lacks counts as its default (an option added since, left off, changes nothing)."""
    saved = with_defaults(json.loads(json.dumps(saved or {}, default=str)), section_defaults(section))
    return diff_keys(saved, json.loads(json.dumps(dataclasses.asdict(section), default=str)), prefix)
