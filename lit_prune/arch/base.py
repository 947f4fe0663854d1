"""The family-independent half of the adapters: slice maps, views over a block, parameter accounting, registry.

Everything else in lit-prune asks the adapter instead of reaching into module names, so a new family is one adapter
file (see ``lit_prune/arch/phi3.py`` for a fused one), never an ``if`` chain elsewhere. An adapter declares where
its projections are (attribute names, fused or not); this module turns that into *slice maps*: for each query head,
KV group and MLP neuron, which rows or columns of which Linear it occupies (:class:`Projection`). Surgery, parameter
accounting, width criteria, statistics hooks, masks and LoRA targets consume the maps. Head and neuron counts are
read from the current module shapes (they change under pruning); ``head_dim`` is read from the text config.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
from torch import nn

Unit = Literal["head", "kv", "neuron"]
"""What a slice holds: query heads (``head``), KV groups (``kv``) or MLP neurons (``neuron``)."""


class UnsupportedModelError(ValueError):
    """The model's ``config.model_type`` has no registered :class:`ModelAdapter`."""


@dataclass(frozen=True)
class Placement:
    """Where one kind of unit sits inside one Linear of a block, independent of any module instance.

    Unit ``u`` (``0 <= u < count``) owns indices ``offset + u·width .. offset + (u+1)·width - 1`` along ``dim``:
    output rows (``dim=0``, bias entries follow) or input columns (``dim=1``).

    Args:
        path: the Linear's dotted path inside the block (``"self_attn.qkv_proj"``).
        unit: what the slice holds.
        dim: 0 for output rows, 1 for input columns.
        offset: first index of unit 0.
        count: number of units.
        width: indices per unit (``head_dim`` for heads and KV groups, 1 for neurons).
    """

    path: str
    unit: Unit
    dim: int
    offset: int
    count: int
    width: int

    @property
    def size(self) -> int:
        """Indices the slice spans along ``dim``."""
        return self.count * self.width

    def indices(self, units: Sequence[int] | None = None) -> torch.Tensor:
        """Absolute indices along ``dim`` of ``units`` (all units when None), in the given order."""
        chosen = torch.arange(self.count) if units is None else torch.as_tensor(list(units), dtype=torch.long)
        return (self.offset + chosen[:, None] * self.width + torch.arange(self.width)).reshape(-1)


@dataclass(frozen=True)
class Projection:
    """A :class:`Placement` bound to a block: the module it lives in and the Linear (or PEFT wrapper) it names.

    Args:
        placement: where the units are.
        parent: the module holding the projection as attribute ``attr``.
        attr: the attribute name (last component of ``placement.path``).
    """

    placement: Placement
    parent: nn.Module
    attr: str

    @property
    def module(self) -> nn.Module:
        """What the block calls: the Linear, or the PEFT/quantized wrapper around it (hooks go here)."""
        module: nn.Module = getattr(self.parent, self.attr)
        return module

    @property
    def linear(self) -> nn.Linear:
        """The Linear itself (a PEFT wrapper's ``base_layer``)."""
        return cast(nn.Linear, base_layer(self.module))

    @property
    def count(self) -> int:
        """Number of units in the slice."""
        return self.placement.count

    @property
    def dim(self) -> int:
        """0: the units are output rows; 1: input columns."""
        return self.placement.dim

    def weight(self) -> torch.Tensor:
        """The units' part of the weight as float32, detached: ``(count·width, in)`` rows or ``(out, count·width)``.

        A view (no copy) when the weight already is float32; a PEFT layer contributes its base weight.
        """
        weight: torch.Tensor = self.linear.weight  # type: ignore[assignment]
        p = self.placement
        return weight.detach().float().narrow(p.dim, p.offset, p.size)

    def indices(self, units: Sequence[int] | None = None) -> torch.Tensor:
        """Absolute indices along :attr:`dim` of ``units`` (all when None)."""
        return self.placement.indices(units)

    def params_per_unit(self) -> int:
        """Weight (and, for rows, bias) elements one unit owns in this Linear."""
        linear = self.linear
        p = self.placement
        if p.dim == 0:
            return p.width * (int(linear.in_features) + (1 if linear.bias is not None else 0))
        return p.width * int(linear.out_features)


@dataclass(frozen=True)
class AttentionView:
    """One block's attention: its current head layout and the slice of each projection per head / KV group.

    ``q`` and ``o`` are per query head (q rows, o columns); ``k`` and ``v`` per KV group (rows). In a fused
    projection (Phi-3's ``qkv_proj``) ``q``, ``k`` and ``v`` are slices of the same Linear.
    """

    module: nn.Module
    q: Projection
    k: Projection
    v: Projection
    o: Projection
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def group_size(self) -> int:
        """Query heads per KV head (1 for multi-head attention)."""
        return self.num_heads // self.num_kv_heads

    @property
    def projections(self) -> tuple[Projection, ...]:
        """Every slice, heads first (q, o) then KV groups (k, v)."""
        return (self.q, self.o, self.k, self.v)

    def linears(self) -> list[Projection]:
        """One projection per distinct Linear (a fused Linear once), in q, k, v, o order."""
        return _distinct((self.q, self.k, self.v, self.o))


@dataclass(frozen=True)
class MLPView:
    """One block's MLP: ``down(act(gate(x)) * up(x))``, or ``down(act(up(x)))`` when ``gate`` is None.

    Each slice is per neuron (gate/up rows, down columns); a fused ``gate_up_proj`` holds ``gate`` and ``up``.
    """

    module: nn.Module
    gate: Projection | None
    up: Projection
    down: Projection

    @property
    def intermediate_size(self) -> int:
        """Current number of MLP neurons."""
        return self.down.count

    @property
    def projections(self) -> tuple[Projection, ...]:
        """Every slice (gate if any, up, down)."""
        return (*((self.gate,) if self.gate is not None else ()), self.up, self.down)

    def linears(self) -> list[Projection]:
        """One projection per distinct Linear, in gate, up, down order."""
        return _distinct(self.projections)


def _distinct(projections: Sequence[Projection]) -> list[Projection]:
    seen: set[tuple[int, str]] = set()
    out = []
    for proj in projections:
        key = (id(proj.parent), proj.attr)
        if key not in seen:
            seen.add(key)
            out.append(proj)
    return out


def model_config(model: nn.Module) -> Any:
    """The Hugging Face config of ``model`` (unwrapped), or None."""
    return getattr(unwrap(model), "config", None)


def text_config(config: Any) -> Any:
    """The decoder's config: ``config.get_text_config(decoder=True)`` where the config has one, else ``config``."""
    if config is not None and hasattr(config, "get_text_config"):
        return config.get_text_config(decoder=True)
    return config


_ADAPTER_MARKER = "lora_"
"""Parameters whose qualified name contains this are PEFT LoRA adapters (``lora_A``, ``lora_B``,
``lora_embedding_A/B``, ``lora_magnitude_vector``), left out of every count so counts describe the base model."""


def _count(module: nn.Module) -> int:
    """Parameters of ``module``, tied weights once; unmerged LoRA adapters are not counted.

    Args:
        module: any module, possibly holding PEFT LoRA layers.

    Returns:
        The number of base-model parameter elements.
    """
    return sum(p.numel() for name, p in module.named_parameters() if _ADAPTER_MARKER not in name)


def base_layer(module: nn.Module) -> nn.Module:
    """The layer a PEFT tuner layer wraps (following nested ``base_layer``s), or ``module`` itself."""
    seen = 0
    while isinstance(getattr(module, "base_layer", None), nn.Module) and seen < 8:
        module = module.base_layer  # type: ignore[assignment]
        seen += 1
    return module


def unwrap(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a PEFT wrapper or a ``CausalLMModule`` (or the model itself)."""
    seen = 0
    while seen < 8:
        seen += 1
        if hasattr(model, "get_base_model") and callable(model.get_base_model):
            inner = model.get_base_model()
            if inner is model:
                break
            model = inner
        elif hasattr(model, "config"):
            break
        elif isinstance(getattr(model, "model", None), nn.Module):
            model = getattr(model, "model")  # a LightningModule holding the HF model
        else:
            break
    return model


def _resolve(root: nn.Module, path: str) -> nn.Module | None:
    """The submodule at dotted ``path`` of ``root`` (``""`` is ``root``), or None."""
    module: Any = root
    for part in filter(None, path.split(".")):
        module = getattr(module, part, None)
        if not isinstance(module, nn.Module):
            return None
    return module


def _split(path: str) -> tuple[str, str]:
    """``"self_attn.q_proj"`` -> ``("self_attn", "q_proj")``."""
    parent, _, attr = path.rpartition(".")
    return parent, attr


class ModelAdapter:
    """Module paths, slice maps and parameter accounting for one decoder family.

    A family is declared by attribute names; the base class derives the slice maps from them. Projection names are
    relative to the attention (``q_attr``, ``k_attr``, ``v_attr``, ``o_attr``) or MLP module (``gate_attr``,
    ``up_attr``, ``down_attr``):

    * separate projections: three different names; one name for all three: a fused ``[q; k; v]`` Linear;
    * ``gate_attr == up_attr``: a fused ``[gate; up]`` Linear; ``gate_attr = None``: a non-gated MLP
      (``down(act(up(x)))``, e.g. Phi-2's ``fc1``/``fc2``).

    Family quirks go into the two ``on_*_resized`` hooks (module attributes the forward reads) and
    :meth:`check_head_pruning`. All methods take the model (or a block) so one adapter serves every instance.
    """

    model_types: tuple[str, ...] = ()
    decoder_path: str = "model"
    """Dotted path from the ``*ForCausalLM`` to the decoder holding the blocks (a multimodal model's text tower
    would be e.g. ``"model.language_model"``)."""
    layers_attr: str = "layers"
    attention_attr: str = "self_attn"
    mlp_attr: str = "mlp"
    q_attr: str = "q_proj"
    k_attr: str = "k_proj"
    v_attr: str = "v_proj"
    o_attr: str = "o_proj"
    gate_attr: str | None = "gate_proj"
    up_attr: str = "up_proj"
    down_attr: str = "down_proj"
    embed_attr: str = "embed_tokens"
    norm_attr: str = "norm"
    lm_head_attr: str = "lm_head"

    # --- structure ---------------------------------------------------------------------------------------------
    def config(self, model: nn.Module) -> Any:
        """The text (decoder) config of ``model``."""
        return text_config(model_config(model))

    def decoder(self, model: nn.Module) -> nn.Module:
        """The decoder stack (embeddings, blocks, final norm) of a ``*ForCausalLM`` or bare decoder model."""
        model = unwrap(model)
        inner = _resolve(model, self.decoder_path)
        return inner if inner is not None and hasattr(inner, self.layers_attr) else model

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        """The transformer blocks, in order."""
        layers = getattr(self.decoder(model), self.layers_attr)
        if not isinstance(layers, nn.ModuleList):
            raise TypeError(f"Expected `{self.layers_attr}` to be an nn.ModuleList, got {type(layers).__name__}")
        return layers

    def num_blocks(self, model: nn.Module) -> int:
        """Current number of transformer blocks."""
        return len(self.blocks(model))

    def head_dim(self, model: nn.Module) -> int:
        """Per-head dimension from the config (``head_dim`` if set, else ``hidden_size // num_attention_heads``)."""
        cfg = self.config(model)
        explicit = getattr(cfg, "head_dim", None)
        return int(explicit) if explicit else int(cfg.hidden_size // cfg.num_attention_heads)

    def hidden_size(self, model: nn.Module) -> int:
        """Width of the residual stream."""
        return int(self.config(model).hidden_size)

    def forward_decoder(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> Any:
        """Run the decoder stack (no LM head, no cache): the one entry point calibration passes go through."""
        return self.decoder(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)

    def forward_logits(
        self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Next-token logits ``(B, T, V)`` of the whole causal LM (no cache): the pass driver's entry with the head."""
        out: torch.Tensor = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return out

    # --- slice maps --------------------------------------------------------------------------------------------
    def _fused_qkv(self) -> bool:
        return self.q_attr == self.k_attr == self.v_attr

    def attention_placements(self, num_heads: int, num_kv_heads: int, head_dim: int) -> dict[str, Placement]:
        """Slice map of the attention for the given widths: ``{"q", "k", "v", "o": Placement}``."""
        a = self.attention_attr
        H, KV, dh = num_heads, num_kv_heads, head_dim
        if self._fused_qkv():
            offsets = {"q": 0, "k": H * dh, "v": (H + KV) * dh}
        elif len({self.q_attr, self.k_attr, self.v_attr}) == 3:
            offsets = {"q": 0, "k": 0, "v": 0}
        else:
            raise TypeError(f"{type(self).__name__}: q/k/v must be three Linears or one fused Linear")
        names = {"q": self.q_attr, "k": self.k_attr, "v": self.v_attr}
        units: dict[str, tuple[Unit, int]] = {"q": ("head", H), "k": ("kv", KV), "v": ("kv", KV)}
        out = {key: Placement(f"{a}.{names[key]}", units[key][0], 0, offsets[key], units[key][1], dh) for key in names}
        out["o"] = Placement(f"{a}.{self.o_attr}", "head", 1, 0, H, dh)
        return out

    def mlp_placements(self, intermediate_size: int) -> dict[str, Placement]:
        """Slice map of the MLP for the given width: ``{"gate" (if gated), "up", "down": Placement}``."""
        m, n = self.mlp_attr, intermediate_size
        out: dict[str, Placement] = {}
        if self.gate_attr is not None:
            out["gate"] = Placement(f"{m}.{self.gate_attr}", "neuron", 0, 0, n, 1)
        up_offset = n if self.gate_attr == self.up_attr else 0
        out["up"] = Placement(f"{m}.{self.up_attr}", "neuron", 0, up_offset, n, 1)
        out["down"] = Placement(f"{m}.{self.down_attr}", "neuron", 1, 0, n, 1)
        return out

    def _bind(self, block: nn.Module, placement: Placement) -> Projection:
        parent_path, attr = _split(placement.path)
        parent = _resolve(block, parent_path)
        if parent is None or not isinstance(getattr(parent, attr, None), nn.Module):
            raise TypeError(f"{type(self).__name__}: the block has no module `{placement.path}`")
        return Projection(placement, parent, attr)

    def _linear_at(self, block: nn.Module, path: str) -> nn.Linear:
        parent_path, attr = _split(path)
        parent = _resolve(block, parent_path)
        module = getattr(parent, attr, None) if parent is not None else None
        if not isinstance(module, nn.Module):
            raise TypeError(f"{type(self).__name__}: the block has no module `{path}`")
        return cast(nn.Linear, base_layer(module))

    def attention(self, block: nn.Module, head_dim: int) -> AttentionView:
        """Slice map and current head counts of a block's attention, read from the projection shapes."""
        a = self.attention_attr
        o = self._linear_at(block, f"{a}.{self.o_attr}")
        q = self._linear_at(block, f"{a}.{self.q_attr}")
        q_rows = int(q.out_features)
        if o.in_features % head_dim:
            raise ValueError(f"{self.o_attr} width {o.in_features} is not a multiple of head_dim={head_dim}")
        H = int(o.in_features) // head_dim
        if self._fused_qkv():
            kv_rows = (q_rows - H * head_dim) // 2
        else:
            kv_rows = int(self._linear_at(block, f"{a}.{self.k_attr}").out_features)
            if q_rows != H * head_dim:
                raise ValueError(
                    f"{self.q_attr} has {q_rows} rows but {self.o_attr} takes {o.in_features} inputs "
                    f"({H} heads of head_dim={head_dim})"
                )
        if kv_rows <= 0 or kv_rows % head_dim:
            raise ValueError(f"The k/v widths ({kv_rows}) are not positive multiples of head_dim={head_dim}")
        KV = kv_rows // head_dim
        places = self.attention_placements(H, KV, head_dim)
        bound = {key: self._bind(block, p) for key, p in places.items()}
        return AttentionView(getattr(block, a), bound["q"], bound["k"], bound["v"], bound["o"], H, KV, head_dim)

    def mlp(self, block: nn.Module) -> MLPView:
        """Slice map of a block's MLP, read from the ``down`` projection's width."""
        down = self._linear_at(block, f"{self.mlp_attr}.{self.down_attr}")
        places = self.mlp_placements(int(down.in_features))
        bound = {key: self._bind(block, p) for key, p in places.items()}
        return MLPView(getattr(block, self.mlp_attr), bound.get("gate"), bound["up"], bound["down"])

    def attentions(self, model: nn.Module) -> list[AttentionView]:
        """Attention views of every block."""
        hd = self.head_dim(model)
        return [self.attention(b, hd) for b in self.blocks(model)]

    def mlps(self, model: nn.Module) -> list[MLPView]:
        """MLP views of every block."""
        return [self.mlp(b) for b in self.blocks(model)]

    def linear_paths(self) -> list[str]:
        """Dotted paths (inside a block) of the prunable Linears, each once: attention q, k, v, o, then the MLP."""
        a, m = self.attention_attr, self.mlp_attr
        names = [f"{a}.{n}" for n in (self.q_attr, self.k_attr, self.v_attr, self.o_attr)]
        names += [f"{m}.{n}" for n in (self.gate_attr, self.up_attr, self.down_attr) if n is not None]
        return list(dict.fromkeys(names))

    def block_linears(self, block: nn.Module) -> dict[str, nn.Module]:
        """``{path inside the block: module}`` of the prunable Linears (PEFT wrappers as they are)."""
        out = {}
        for path in self.linear_paths():
            parent_path, attr = _split(path)
            parent = _resolve(block, parent_path)
            module = getattr(parent, attr, None) if parent is not None else None
            if not isinstance(module, nn.Module):
                raise TypeError(f"{type(self).__name__}: the block has no module `{path}`")
            out[path] = module
        return out

    def lora_targets(self) -> tuple[str, ...]:
        """Default LoRA ``target_modules``: the last name of every prunable Linear of a block."""
        return tuple(path.rpartition(".")[2] for path in self.linear_paths())

    def expected_shapes(
        self, num_heads: int, num_kv_heads: int, intermediate_size: int, head_dim: int, hidden: int
    ) -> dict[str, tuple[int, ...]]:
        """``{"<path>.weight": shape, "<path>.bias": shape}`` of each prunable Linear of a block with these widths.

        Biases are listed for every Linear whose rows are units (checked only where a checkpoint has them).
        """
        places = [
            *self.attention_placements(num_heads, num_kv_heads, head_dim).values(),
            *self.mlp_placements(intermediate_size).values(),
        ]
        out: dict[str, tuple[int, ...]] = {}
        for path in self.linear_paths():
            rows = sum(p.size for p in places if p.path == path and p.dim == 0) or hidden
            cols = sum(p.size for p in places if p.path == path and p.dim == 1) or hidden
            out[f"{path}.weight"] = (rows, cols)
            if any(p.path == path and p.dim == 0 for p in places):
                out[f"{path}.bias"] = (rows,)
        return out

    # --- family hooks for width surgery -------------------------------------------------------------------------
    def check_head_pruning(self, model: nn.Module) -> None:
        """Raise if this model's heads cannot be removed (a family quirk); nothing is modified. Default: allowed."""

    def on_attention_resized(self, attention: nn.Module, num_heads: int, num_kv_heads: int) -> None:
        """Bring the attention module's own width attributes in line after its heads were removed."""
        for name, value in (
            ("num_key_value_groups", num_heads // num_kv_heads),
            ("num_heads", num_heads),
            ("num_attention_heads", num_heads),
            ("num_key_value_heads", num_kv_heads),
        ):
            _set_int_attr(attention, name, value)

    def on_mlp_resized(self, mlp: nn.Module, intermediate_size: int) -> None:
        """Bring the MLP module's own width attributes in line after neurons were removed."""
        _set_int_attr(mlp, "intermediate_size", intermediate_size)

    # --- module lookups -----------------------------------------------------------------------------------------
    def embeddings(self, model: nn.Module) -> nn.Embedding:
        """The input token embedding."""
        return getattr(self.decoder(model), self.embed_attr)

    def lm_head(self, model: nn.Module) -> nn.Linear | None:
        """The output projection, or None for a bare decoder."""
        return getattr(unwrap(model), self.lm_head_attr, None)

    def final_norm(self, model: nn.Module) -> nn.Module:
        """The norm applied after the last block."""
        return getattr(self.decoder(model), self.norm_attr)

    # --- parameter accounting ----------------------------------------------------------------------------------
    def total_params(self, model: nn.Module) -> int:
        """All parameters, tied weights counted once; unmerged LoRA adapters are not counted."""
        return _count(unwrap(model))

    def embedding_params(self, model: nn.Module) -> int:
        """Input embedding plus the LM head when it is not tied to the embedding.

        Unmerged LoRA adapters are not counted: a PEFT-wrapped ``embed_tokens`` or ``lm_head`` counts as the base
        layer it wraps.
        """
        embed_weight: torch.Tensor = base_layer(self.embeddings(model)).weight  # type: ignore[assignment]
        n = embed_weight.numel()
        head = self.lm_head(model)
        if head is not None:
            base_head = base_layer(head)
            if base_head.weight is not embed_weight:
                n += _count(base_head)
        return n

    def non_embedding_params(self, model: nn.Module) -> int:
        """Everything but the embedding and an untied LM head; unmerged LoRA adapters are not counted."""
        return self.total_params(model) - self.embedding_params(model)

    def block_params(self, model: nn.Module) -> list[int]:
        """Parameters of each block (attention, MLP and norms); unmerged LoRA adapters are not counted."""
        return [_count(b) for b in self.blocks(model)]

    def head_params(self, view: AttentionView) -> int:
        """Parameters one query head owns: its q rows and its o columns (k/v are shared by the group)."""
        return view.q.params_per_unit() + view.o.params_per_unit()

    def kv_group_params(self, view: AttentionView) -> int:
        """Parameters one KV group owns: its query heads plus its k and v rows."""
        return view.group_size * self.head_params(view) + view.k.params_per_unit() + view.v.params_per_unit()

    def neuron_params(self, view: MLPView) -> int:
        """Parameters one MLP neuron owns: its gate and up rows (with bias) and its down column."""
        return sum(p.params_per_unit() for p in view.projections)


def _set_int_attr(module: nn.Module, name: str, value: int) -> None:
    """Update an int attribute the module already has (families differ in which they keep)."""
    current = module.__dict__.get(name)
    if isinstance(current, int) and not isinstance(current, bool):
        setattr(module, name, value)


def own_config(module: nn.Module, **values: int) -> None:
    """Give ``module`` its own shallow copy of its ``config`` with ``values`` set (for forwards reading widths there).

    Phi-3's attention reads ``config.num_attention_heads`` in its forward; after a non-uniform width change each
    block needs its own count while the model's config describes the widest block.
    """
    cfg = getattr(module, "config", None)
    if cfg is None:
        return
    if not getattr(module, "_lit_prune_own_config", False):
        cfg = copy.copy(cfg)
        object.__setattr__(module, "_lit_prune_own_config", True)
    for name, value in values.items():
        setattr(cfg, name, value)
    module.config = cfg


_REGISTRY: dict[str, ModelAdapter] = {}


def register_adapter(adapter: ModelAdapter) -> None:
    """Make ``adapter`` the one :func:`adapter_for` returns for each of its ``model_types``."""
    for model_type in adapter.model_types:
        _REGISTRY[model_type] = adapter


def supported_model_types() -> list[str]:
    """Model types that have an adapter."""
    return sorted(_REGISTRY)


def adapter_for_type(model_type: str | None, what: str = "") -> ModelAdapter:
    """The adapter registered for ``model_type``; the loaders call it as soon as a config is read, before weights.

    Args:
        model_type: a ``config.model_type`` (``"llama"``, ...).
        what: what the type was read from (a class name, a ``config.json`` path), quoted in the error.

    Raises:
        UnsupportedModelError: naming the model type and listing the supported ones.
    """
    if model_type not in _REGISTRY:
        raise UnsupportedModelError(
            f"lit-prune has no adapter for model_type={model_type!r}{f' ({what})' if what else ''}; "
            f"supported: {supported_model_types()}. Register one with lit_prune.arch.register_adapter (see "
            "'Adding a model family' in the README)"
        )
    return _REGISTRY[model_type]


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter for the text config's ``model_type``.

    Raises:
        UnsupportedModelError: naming the model type and listing the supported ones.
    """
    cfg = text_config(model_config(model))
    return adapter_for_type(getattr(cfg, "model_type", None), type(model).__name__)


def block_linears(model: nn.Module) -> list[dict[str, nn.Linear]]:
    """Per block, ``{name: Linear}`` of its prunable projections in the adapter's order (q, k, v, o, gate, up, down).

    A fused projection (Phi-3's ``qkv_proj``) is one entry. A projection wrapped by PEFT counts as the Linear it wraps
    (``base_layer``); its name is the wrapper's.

    Raises:
        UnsupportedModelError: if the model family has no adapter.
        TypeError: if a projection is not an ``nn.Linear``.
    """
    hf_model = unwrap(model)
    adapter = adapter_for(hf_model)
    names = {id(module): name for name, module in hf_model.named_modules()}
    per_block = []
    for block in adapter.blocks(hf_model):
        found: dict[str, nn.Linear] = {}
        for slot in adapter.block_linears(block).values():
            linear = base_layer(slot)
            if not isinstance(linear, nn.Linear):
                raise TypeError(f"`{names[id(slot)]}` must be an nn.Linear to be pruned, got {type(linear).__name__}")
            found[names[id(slot)]] = linear
        per_block.append(found)
    return per_block
