"""Settings of the MoRA layer and of its injection into a model."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

# Default target modules per architecture (``config.model_type``): the attention projections; MLP projections
# are added when ``MoRAConfig.include_mlp`` is set.
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
DEFAULT_TARGETS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    arch: (ATTENTION_TARGETS, MLP_TARGETS)
    for arch in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text",
                 "phi3", "olmo", "olmo2", "granite")
}

DELTA_MODES = ("inference", "always")
GATE_MODES = ("self", "router", "none")
GRAD_MODES = ("exact", "sparse")


class MoRAConfigError(ValueError):
    """A MoRA setting outside its valid range."""


@dataclass
class MoRAConfig:
    """How each adapted linear layer gates its bank of rank-1 experts (docs/design.md, The method; defaults are
    the paper's).

    Attributes:
        r_task: experts added per task (one block); paper: 8.
        k: activation budget, the number of experts kept per token (``min(k, R)``); paper: 8.
        tau: softmax temperature over the kept scores; paper: 0.03.
        delta: threshold on the normalised score; kept experts with ``s_i < delta`` get weight 0 (no
            renormalisation). ``None`` disables it; paper: 0.2 at inference.
        delta_mode: when ``delta`` applies: ``"inference"`` (eval mode only, the paper's choice) or ``"always"``.
        alpha: LoRA alpha; a block's scale is ``alpha / r_task``, fixed at its creation. ``None`` means
            ``2 * r_task`` (the paper's choice).
        dropout: dropout on the layer input before the keys (train mode only); paper: 0.1.
        gate: ``"self"`` (MoRA's self-activated top-k gate over experts), ``"router"`` (the MoE-LoRA baseline: a
            learned router row per block picks ``router_top_k`` blocks per token; set by ``method: moe_lora``) or
            ``"none"`` (no gate, ``w == 1``: the layer is a plain LoRA of rank R; set by ``seq_lora`` and
            ``olora``). Replaces the former pair ``gated`` + ``gate`` (``upgrade_legacy`` maps it).
        router_top_k: blocks kept per token by the router (gate ``"router"`` only).
        target_modules: module names to adapt (last name component); empty means the architecture's default.
        include_mlp: also adapt the MLP projections when ``target_modules`` is empty.
        grad: gradient of the self-activated gate. ``"exact"`` (default): the true derivative of the forward
            (what plain autograd of normalise → top-k → softmax/tau → threshold gives, as the authors train):
            kept experts through the softmax weights and ``z``, every expert and the input also through the
            shared norm ``‖z‖``. ``"sparse"``: a token's gradient reaches only the experts it selected (the
            norm path cut for the others); never-selected experts then keep their initial keys.
        eps: floor of the score norm.
        gate_dtype: dtype of the gate arithmetic for half-precision inputs (``float32`` keeps the softmax with a
            small temperature accurate in bf16).
    """

    r_task: int = 8
    k: int = 8
    tau: float = 0.03
    delta: float | None = 0.2
    delta_mode: str = "inference"
    alpha: float | None = None
    dropout: float = 0.1
    gate: str = "self"
    router_top_k: int = 2
    target_modules: list[str] = field(default_factory=list)
    include_mlp: bool = False
    grad: str = "exact"
    eps: float = 1e-12

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``MoRAConfigError`` naming the setting and its valid range."""
        if not isinstance(self.r_task, int) or self.r_task < 1:
            raise MoRAConfigError(f"mora.r_task={self.r_task!r} is invalid: experts per task must be an integer >= 1")
        if not isinstance(self.k, int) or self.k < 1:
            raise MoRAConfigError(f"mora.k={self.k!r} is invalid: the activation budget must be an integer >= 1")
        if not (isinstance(self.tau, (int, float)) and math.isfinite(self.tau) and self.tau > 0):
            raise MoRAConfigError(f"mora.tau={self.tau!r} is invalid: the temperature must be a finite number > 0")
        if self.delta is not None and not (isinstance(self.delta, (int, float)) and -1.0 <= self.delta <= 1.0):
            raise MoRAConfigError(
                f"mora.delta={self.delta!r} is invalid: the threshold on a normalised score must be in [-1, 1] "
                "or null to disable it")
        if self.delta_mode not in DELTA_MODES:
            raise MoRAConfigError(f"mora.delta_mode={self.delta_mode!r} is invalid: choose one of {DELTA_MODES}")
        if self.alpha is not None and not (isinstance(self.alpha, (int, float)) and self.alpha > 0):
            raise MoRAConfigError(f"mora.alpha={self.alpha!r} is invalid: must be > 0 (or null for 2 * r_task)")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise MoRAConfigError(f"mora.dropout={self.dropout!r} is invalid: must be in [0, 1)")
        if not (isinstance(self.eps, (int, float)) and self.eps > 0):
            raise MoRAConfigError(f"mora.eps={self.eps!r} is invalid: must be > 0")
        if self.grad not in GRAD_MODES:
            raise MoRAConfigError(f"mora.grad={self.grad!r} is invalid: choose one of {GRAD_MODES} (exact: the true "
                                  "derivative of the gate; sparse: only the selected experts get gradient)")
        if self.gate not in GATE_MODES:
            raise MoRAConfigError(f"mora.gate={self.gate!r} is invalid: choose one of {GATE_MODES}")
        if not isinstance(self.router_top_k, int) or isinstance(self.router_top_k, bool) or self.router_top_k < 1:
            raise MoRAConfigError(f"mora.router_top_k={self.router_top_k!r} is invalid: blocks kept per token "
                                  "must be an integer >= 1")
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]

    @property
    def block_scale(self) -> float:
        """Scale of a block created now: ``alpha / r_task``."""
        alpha = self.alpha if self.alpha is not None else 2.0 * self.r_task
        return float(alpha) / self.r_task

    def gate_settings(self) -> dict:
        """The settings the layer's forward needs."""
        return {"k": self.k, "tau": float(self.tau), "delta": self.delta, "delta_mode": self.delta_mode,
                "eps": float(self.eps), "gate": self.gate,
                "router_top_k": self.router_top_k, "grad": self.grad}

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @staticmethod
    def upgrade_legacy(data: dict) -> dict:
        """Map the former pair ``gated`` (bool) + ``gate`` (``self``/``router``) onto the one ``gate`` setting.

        ``gated: true`` keeps ``gate``; ``gated: false`` is ``gate: none`` (plain LoRA). Configs, run directories
        and adapters written before the change load unchanged through this.

        Raises:
            MoRAConfigError: ``gated: false`` with ``gate: router``, which the former checks also refused, or
                ``gated: true`` with ``gate: none`` (the two keys contradict each other).
        """
        if "gated" not in data:
            return data
        data = dict(data)
        gated, gate = data.pop("gated"), data.get("gate", "self")
        if not isinstance(gated, bool):
            raise MoRAConfigError(f"mora.gated={gated!r} is invalid (a former setting): remove it and set mora.gate "
                                  "to self, router or none")
        fix = "remove mora.gated and set mora.gate: none (plain LoRA), self (MoRA) or router (MoE-LoRA)"
        if not gated and gate == "router" or gated and gate == "none":
            raise MoRAConfigError(f"mora.gated={str(gated).lower()} contradicts mora.gate={gate!r}: {fix}")
        if not gated:
            data["gate"] = "none"
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "MoRAConfig":
        """A config from its ``to_dict`` form (also the former ``gated`` form); unknown keys are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in cls.upgrade_legacy(data).items() if k in names})
