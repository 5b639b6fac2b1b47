"""params.yaml (composed by DVC/Hydra from conf/): load, compose with overrides, validate against a typed schema.

The schema is a tree of dataclasses mirroring params.yaml. Validation walks the YAML against it:
an unknown key names the nearest valid one, a wrong type or an impossible value names the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from dpa_core.errors import DPAInputError

CONF_DIR = Path("conf")  # Hydra config dir (DVC's default): config.yaml + profile/<name>.yaml


class ParamsError(DPAInputError):
    pass


# ---- schema -----------------------------------------------------------------------------------

@dataclass
class World:
    size: Literal["smoke", "default"] = "default"
    seed: int = 0
    out: str = "data/toyworld"
    base_models: Optional[str] = None
    verbose_style: float = 1.0

    def check(self, key: str) -> None:
        if not 0.0 <= self.verbose_style <= 1.0:
            raise ParamsError(f"{key}.verbose_style must lie in 0..1 (got {self.verbose_style}).", file="params.yaml",
                              fix="use 1 for the full florid register, 0 for plain sentences.")


@dataclass
class Model:
    vision: str = ""
    llm: str = ""
    image_token: str = "<image>"
    add_image_token: bool = True


@dataclass
class CaptionSource:
    name: str = ""
    path: str = ""
    image_root: str = ""
    weight: float = 1.0
    count: Optional[int] = None

    def check(self, key: str) -> None:
        _positive(self.weight, f"{key}.weight", allow_zero=True)
        if self.count is not None:
            _positive(self.count, f"{key}.count")


@dataclass
class InstructionSource:
    name: str = ""
    path: str = ""
    image_root: str = ""


@dataclass
class Data:
    root: str = "data"
    captions: list[CaptionSource] = field(default_factory=list)
    instructions: list[InstructionSource] = field(default_factory=list)

    def check(self, key: str) -> None:
        for what in ("captions", "instructions"):
            sources = getattr(self, what)
            if not sources:
                raise ParamsError(f"{key}.{what} is empty.", file="params.yaml", fix=f"list at least one source.")
            names = [s.name for s in sources]
            if len(set(names)) != len(names):
                raise ParamsError(f"{key}.{what} has duplicate names {names}.", file="params.yaml",
                                  fix="give each source a unique name.")
            root = Path(self.root).resolve()
            for i, s in enumerate(sources):
                for attr in ("path", "image_root"):
                    p = Path(getattr(s, attr)).resolve()
                    if not p.is_relative_to(root):
                        raise ParamsError(
                            f"{key}.{what}[{i}].{attr} = {getattr(s, attr)!r} is outside data.root ({self.root}); "
                            "DVC would not see changes to it.", file="params.yaml",
                            fix="move or symlink the data under data.root, or set data.root to a common parent.")


@dataclass
class Mix:
    seed: int = 0
    total: Optional[int] = None
    dedup: bool = True

    def check(self, key: str) -> None:
        if self.total is not None:
            _positive(self.total, f"{key}.total")


@dataclass
class Arm:
    proxy: bool = False
    loss: Literal["vanilla", "cmo", "cal"] = "vanilla"


@dataclass
class Study:
    proxy_arms: list[str] = field(default_factory=list)
    plain_arms: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0])

    def check(self, key: str) -> None:
        if not self.seeds:
            raise ParamsError(f"{key}.seeds is empty.", file="params.yaml", fix="list at least one seed, e.g. [0].")
        if len(set(self.seeds)) != len(self.seeds):
            raise ParamsError(f"{key}.seeds has duplicates {self.seeds}.", file="params.yaml", fix="list each once.")
        if not (self.proxy_arms or self.plain_arms):
            raise ParamsError(f"{key}: no arm to run.", file="params.yaml", fix="list arms in proxy_arms/plain_arms.")

    @property
    def arms(self) -> list[str]:
        return [*self.proxy_arms, *self.plain_arms]


@dataclass
class Loss:
    delta_min: float = 0.05
    delta_max: float = 0.5
    cal_min: float = 1.0
    cal_max: float = 5.0
    window: int = 3
    smoothing: Literal["flat", "per_sequence"] = "flat"
    image_free: Literal["efficient", "reference"] = "efficient"
    image_boundary: Literal["last_text", "image_position"] = "last_text"
    cmo_in_align: bool = True
    cmo_in_finetune: bool = True

    def check(self, key: str) -> None:
        if not -1.0 <= self.delta_min < self.delta_max <= 1.0:
            raise ParamsError(f"{key}: need -1 <= delta_min < delta_max <= 1 (got {self.delta_min}, "
                              f"{self.delta_max}).", file="params.yaml", fix="paper defaults: 0.05 and 0.5.")
        if not self.cal_min < self.cal_max:
            raise ParamsError(f"{key}: need cal_min < cal_max.", file="params.yaml", fix="paper defaults: 1 and 5.")
        if self.window < 1 or self.window % 2 == 0:
            raise ParamsError(f"{key}.window must be an odd number >= 1 (got {self.window}).", file="params.yaml",
                              fix="use 3 (the paper) or 1 (no smoothing).")


@dataclass
class Lora:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0

    def check(self, key: str) -> None:
        _positive(self.r, f"{key}.r")
        _positive(self.alpha, f"{key}.alpha")
        if not 0.0 <= self.dropout < 1.0:
            raise ParamsError(f"{key}.dropout must be in [0, 1) (got {self.dropout}).", file="params.yaml",
                              fix="use e.g. 0.0 or 0.05.")


@dataclass
class Train:
    learning_rate: float = 1e-3
    epochs: float = 1.0
    max_steps: int = -1
    global_batch_size: int = 8
    per_device_batch_size: int = 8
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    save_steps: int = 200
    gradient_checkpointing: bool = False
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    group_by_modality_length: bool = False

    def check(self, key: str) -> None:
        _positive(self.learning_rate, f"{key}.learning_rate")
        _positive(self.global_batch_size, f"{key}.global_batch_size")
        _positive(self.per_device_batch_size, f"{key}.per_device_batch_size")
        if self.max_steps <= 0:
            _positive(self.epochs, f"{key}.epochs")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ParamsError(f"{key}.warmup_ratio must be in [0, 1) (got {self.warmup_ratio}).", file="params.yaml",
                              fix="the paper uses 0.03.")
        if self.global_batch_size % self.per_device_batch_size:
            raise ParamsError(f"{key}.global_batch_size ({self.global_batch_size}) is not a multiple of "
                              f"per_device_batch_size ({self.per_device_batch_size}).", file="params.yaml",
                              fix="gradient accumulation is derived as global / (per_device x processes).")


@dataclass
class Proxy:
    lora: Lora = field(default_factory=Lora)
    max_length: int = 128
    sequence_end: Literal["eos", "newline"] = "eos"
    train: Train = field(default_factory=Train)

    def check(self, key: str) -> None:
        if self.train.group_by_modality_length:
            raise ParamsError(f"{key}.train.group_by_modality_length: the proxy stage trains on text only, "
                              "there is no modality to group by.", file="params.yaml",
                              fix=f"set {key}.train.group_by_modality_length: false.")


@dataclass
class Align:
    max_length: int = 256
    image_aspect_ratio: Literal["crop", "pad"] = "crop"
    sequence_end: Literal["eos", "newline"] = "eos"
    train: Train = field(default_factory=Train)


@dataclass
class Finetune:
    tune: Literal["lora", "full"] = "lora"
    lora: Lora = field(default_factory=Lora)
    max_length: int = 256
    image_aspect_ratio: Literal["crop", "pad"] = "crop"
    image_first: bool = False
    system_prompt: Optional[str] = None
    connector_learning_rate: Optional[float] = None
    train: Train = field(default_factory=Train)

    def check(self, key: str) -> None:
        if self.connector_learning_rate is not None:
            _positive(self.connector_learning_rate, f"{key}.connector_learning_rate")


@dataclass
class Benchmark:
    name: str = ""
    kind: Literal["builtin_tsv", "vlmeval", "lmeval"] = "builtin_tsv"
    path: Optional[str] = None  # local data file (builtin_tsv, lmeval toy task)
    task: Optional[str] = None  # dataset/task name for vlmeval and lm-eval
    limit: Optional[int] = None  # per-benchmark overrides of the evaluate.* defaults
    batch_size: Optional[int] = None
    max_new_tokens: Optional[int] = None
    prompt: Optional[str] = None  # lmeval local tasks: prompt style (see docs/evaluation.md)
    num_fewshot: Optional[int] = None  # lmeval
    allow_download: Optional[bool] = None  # vlmeval: fetch a missing dataset TSV (needs network)
    optional: bool = False  # data or extra missing here: skip it (compare averages what every arm has) instead of failing


@dataclass
class Evaluate:
    benchmarks: list[Benchmark] = field(default_factory=list)
    batch_size: int = 16
    max_new_tokens: int = 8
    limit: Optional[int] = None
    reference_row: bool = True
    lmu_data: Optional[str] = None


@dataclass
class Reliance:
    captions: list[InstructionSource] = field(default_factory=list)  # held-out caption sets (LLaVA format)
    content_words: Optional[str] = None  # JSON list of content words; None: the all-token mean only
    limit: Optional[int] = None
    batch_size: int = 16
    max_length: int = 256

    def check(self, key: str) -> None:
        _positive(self.batch_size, f"{key}.batch_size")
        _positive(self.max_length, f"{key}.max_length")
        if self.limit is not None:
            _positive(self.limit, f"{key}.limit")
        names = [c.name for c in self.captions]
        if len(set(names)) != len(names):
            raise ParamsError(f"{key}.captions has duplicate names {names}.", file="params.yaml",
                              fix="give each caption set a unique name (it names its metrics).")


@dataclass
class Tracking:
    experiment: str = "dpa-study"
    uri: str = "sqlite:///mlflow.db"
    log_checkpoints: bool = True


@dataclass
class Runtime:
    outputs: str = "outputs"
    executor: Literal["local", "docker"] = "local"
    image: str = "dpa:cpu"
    gpus: Optional[str] = None
    launcher: Literal["python", "accelerate"] = "python"
    accelerate_config: str = "configs/accelerate/ddp.yaml"
    num_processes: int = 1


@dataclass
class Params:
    profile: str = "toy"
    world: World = field(default_factory=World)
    model: Model = field(default_factory=Model)
    data: Data = field(default_factory=Data)
    mix: Mix = field(default_factory=Mix)
    arms: dict[str, Arm] = field(default_factory=dict)
    study: Study = field(default_factory=Study)
    loss: Loss = field(default_factory=Loss)
    proxy: Proxy = field(default_factory=Proxy)
    align: Align = field(default_factory=Align)
    finetune: Finetune = field(default_factory=Finetune)
    evaluate: Evaluate = field(default_factory=Evaluate)
    reliance: Reliance = field(default_factory=Reliance)
    tracking: Tracking = field(default_factory=Tracking)
    runtime: Runtime = field(default_factory=Runtime)

    def check(self, key: str) -> None:
        for group, want in (("proxy_arms", True), ("plain_arms", False)):
            for name in getattr(self.study, group):
                if name not in self.arms:
                    raise ParamsError(f"study.{group} names an unknown arm {name!r}.{_nearest(name, self.arms)}",
                                      file="params.yaml", fix="define it under `arms:` or fix the name.")
                if self.arms[name].proxy != want:
                    other = "plain_arms" if want else "proxy_arms"
                    raise ParamsError(f"arm {name!r} has proxy: {self.arms[name].proxy}, so it belongs in "
                                      f"study.{other}, not study.{group}.", file="params.yaml",
                                      fix=f"move {name!r} to study.{other}.")
        root = Path(self.data.root).resolve()
        for i, c in enumerate(self.reliance.captions):
            for attr in ("path", "image_root"):
                if not Path(getattr(c, attr)).resolve().is_relative_to(root):
                    raise ParamsError(f"reliance.captions[{i}].{attr} = {getattr(c, attr)!r} is outside data.root "
                                      f"({self.data.root}); DVC would not see changes to it.", file="params.yaml",
                                      fix="move or symlink the held-out captions under data.root.")
        if self.reliance.content_words and not Path(self.reliance.content_words).resolve().is_relative_to(root):
            raise ParamsError(f"reliance.content_words = {self.reliance.content_words!r} is outside data.root "
                              f"({self.data.root}).", file="params.yaml", fix="move the word list under data.root.")
        local = [(f"evaluate.benchmarks[{i}].path", b.path) for i, b in enumerate(self.evaluate.benchmarks) if b.path]
        if any(b.kind == "vlmeval" for b in self.evaluate.benchmarks) and self.evaluate.lmu_data:
            local.append(("evaluate.lmu_data", self.evaluate.lmu_data))
        for key, value in local:  # the evaluate stages depend on data.root: what they read must lie there
            if not Path(value).resolve().is_relative_to(root):
                raise ParamsError(f"{key} = {value!r} is outside data.root ({self.data.root}); DVC would not see "
                                  "changes to it.", file="params.yaml",
                                  fix="move or symlink the benchmark data under data.root (e.g. data/LMUData).")
        if self.runtime.num_processes > 1 and self.runtime.launcher != "accelerate":
            raise ParamsError("runtime.num_processes > 1 needs runtime.launcher: accelerate.", file="params.yaml",
                              fix="set launcher: accelerate, or num_processes: 1.")

    # -- views used by the stages ---------------------------------------------------------------
    def arm(self, name: str) -> Arm:
        if name not in self.arms:
            raise ParamsError(f"unknown arm {name!r}.{_nearest(name, self.arms)}", file="params.yaml",
                              fix="use an arm defined under `arms:`.")
        return self.arms[name]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---- validation ---------------------------------------------------------------------------------

def _positive(value, key: str, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ParamsError(f"{key} must be {'>= 0' if allow_zero else '> 0'} (got {value}).", file="params.yaml",
                          fix=f"set {key} to a {'non-negative' if allow_zero else 'positive'} number.")


def _nearest(name: str, options) -> str:
    options = [str(o) for o in options]
    close = difflib.get_close_matches(str(name), options, n=1, cutoff=0.5)
    # an abbreviation or an extension of a valid key ("rank" for "r", "lr" for "learning_rate") too
    close = close or [o for o in options if o.startswith(str(name)) or str(name).startswith(o)][:1]
    return f" Did you mean {close[0]!r}?" if close else ""


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _convert(value: Any, tp, key: str):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        return _convert(value, next(a for a in args if a is not type(None)), key)
    if origin is Literal:
        if value not in args:
            raise ParamsError(f"{key} = {value!r} is not one of {list(args)}.{_nearest(value, args)}",
                              file="params.yaml", fix=f"use one of {list(args)}.")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ParamsError(f"{key} must be a list (got {type(value).__name__}).", file="params.yaml",
                              fix=f"write {key} as a YAML list.")
        return [_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ParamsError(f"{key} must be a mapping.", file="params.yaml", fix=f"write {key} as a YAML mapping.")
        return {k: _convert(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and FLOAT_12.match(value.strip()):
        return float(value.strip())  # "2e-5" from a quoted YAML value or a Prefect text field
    if tp is bool and not isinstance(value, bool):
        raise ParamsError(f"{key} must be true or false (got {value!r}).", file="params.yaml", fix="use true/false.")
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ParamsError(f"{key} must be of type {_type_name(tp)} (got {value!r}).", file="params.yaml",
                          fix=f"set {key} to a {_type_name(tp)}.")
    return value


def build(cls, data: Any, key: str = ""):
    """An instance of dataclass `cls` from YAML data, checking keys, types and values."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ParamsError(f"{key or 'params'} must be a mapping (got {type(data).__name__}).", file="params.yaml",
                          fix="check the indentation.")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for k in data:
        if k not in names:
            where = f"{key}.{k}" if key else k
            raise ParamsError(f"unknown key {where!r}.{_nearest(k, names)}", file="params.yaml",
                              fix=f"valid keys here: {', '.join(names)}.")
    kwargs = {k: _convert(v, hints[k], f"{key}.{k}" if key else k) for k, v in data.items()}
    obj = cls(**kwargs)
    if hasattr(obj, "check"):
        obj.check(key or "params")
    return obj


# ---- loading ------------------------------------------------------------------------------------

# YAML 1.2's float: `2e-5`, `1e-3` and `5E-4` are floats (PyYAML follows YAML 1.1, where an exponent
# needs a dot and a sign, so it read them as strings; DVC and ruamel read them as floats).
FLOAT_12 = re.compile(r"""^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""", re.X)


class ParamsLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 floats and duplicate keys refused (DVC refuses them too)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: let PyYAML report it
                continue
            if first is not None:
                raise ParamsError(
                    f"duplicate key {key!r} at line {key_node.start_mark.line + 1} (first at line {first}).",
                    file=key_node.start_mark.name, fix="keep one of the two; YAML would silently use the last.")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


ParamsLoader.yaml_implicit_resolvers = {k: [r for r in v if r[0] != "tag:yaml.org,2002:float"]
                                        for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
ParamsLoader.add_implicit_resolver("tag:yaml.org,2002:float", FLOAT_12, list("-+0123456789."))


def load_yaml(text: str, name: str = "<string>"):
    """YAML as params files are read everywhere here (params.yaml, profiles, -S values)."""
    loader = ParamsLoader(text)
    loader.name = name
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()

def set_dotted(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """'a.b=value' with a YAML-typed value (as `dvc exp run -S`)."""
    if "=" not in text:
        raise ParamsError(f"override {text!r} is not key=value.", fix="write e.g. proxy.lora.r=64.")
    k, v = text.split("=", 1)
    try:
        return k.strip(), load_yaml(v, f"override {text!r}")
    except yaml.YAMLError as e:
        raise ParamsError(f"override {text!r}: the value is not valid YAML ({e}).",
                          fix="quote strings, write lists as [a, b].") from None


def compose(conf_dir: str | Path = CONF_DIR, overrides: dict[str, Any] | None = None) -> dict:
    """The effective settings as `dvc exp run -S k=v ...` writes them into params.yaml: Hydra composes
    conf/config.yaml with the selected profile (conf/profile/<name>.yaml, `profile` override or the
    default of config.yaml), then every other override is set over both."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf

    conf_dir = Path(conf_dir).resolve()
    if not (conf_dir / "config.yaml").is_file():
        raise ParamsError("no conf/config.yaml: the settings are composed from it.", file=conf_dir / "config.yaml",
                          fix="run from the project root (or pass the params.yaml that lies beside conf/).")
    rest = dict(overrides or {})
    groups = []
    if "profile" in rest:
        profile = rest.pop("profile")
        known = sorted(p.stem for p in (conf_dir / "profile").glob("*.yaml"))
        if profile not in known:
            raise ParamsError(f"unknown profile {profile!r}.{_nearest(profile, known)}",
                              file=conf_dir / "profile", fix=f"use one of {known}.")
        groups.append(f"profile={profile}")
    try:
        with initialize_config_dir(str(conf_dir), version_base=None):
            cfg = hydra_compose(config_name="config", overrides=groups)
    except HydraException as e:
        raise ParamsError(f"cannot compose the settings: {e}", file=conf_dir,
                          fix="fix the YAML of conf/config.yaml or the profile it names.") from None
    data = OmegaConf.to_container(cfg, resolve=True)
    for k, v in rest.items():
        set_dotted(data, k, v)
    return data


def write_params(path: str | Path, data: dict) -> None:
    """params.yaml as DVC's Hydra composition writes it (OmegaConf's YAML), replaced atomically."""
    from omegaconf import OmegaConf

    path = Path(path)
    text = OmegaConf.to_yaml(OmegaConf.create(data))
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return  # unchanged: leave the file (and its mtime) alone
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def load_params(path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None) -> Params:
    """The settings the stages run with, validated.

    Without overrides: params.yaml as it is (what DVC interpolates and tracks, what `dvc repro` runs).
    With overrides: what `dvc exp run -S k=v ...` would write there, i.e. conf/ (beside params.yaml)
    composed with the profile and the overrides (`compose`). There is no second merge: the values
    DVC records are the values the stages use.
    """
    path = Path(path)
    if overrides:
        return build(Params, compose(path.parent / CONF_DIR, overrides))
    try:
        raw = load_yaml(path.read_text(), str(path)) or {}
    except FileNotFoundError:
        raise ParamsError("params file not found.", file=path,
                          fix="run from the project root, or write it from conf/ with `dpa compose`.") from None
    except yaml.YAMLError as e:
        raise ParamsError(f"not valid YAML: {e}", file=path, fix="fix the YAML syntax.") from None
    return build(Params, raw)


def _leaves(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_leaves(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def drift_from_conf(path: str | Path, profile: str) -> list[str]:
    """The keys where params.yaml differs from conf/ composed with `profile` ([] when none, or no conf/)."""
    path = Path(path)
    if not (path.parent / CONF_DIR / "config.yaml").is_file():
        return []
    have = _leaves(build(Params, load_yaml(path.read_text(), str(path))).to_dict())
    want = _leaves(build(Params, compose(path.parent / CONF_DIR, {"profile": profile})).to_dict())
    return sorted(k for k in have.keys() | want.keys() if have.get(k) != want.get(k))
