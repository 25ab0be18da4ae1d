"""Tensor-parallel placement of a JAX model's parameters on a `jax.sharding.Mesh`.

Megatron-style: the projections into heads and into the MLP width (q/k/v, gate/up) are split by
output rows, the projections back (o, down) by input columns, over one mesh axis; embeddings and
norms are replicated. XLA partitions the jitted step from these shardings (inserting the
all-reduces) and places the cache buffers. Use:

    mesh = jax.sharding.Mesh(jax.devices(), ("tp",))
    shard_model(model, mesh)          # then model.forward / generate as usual
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gemma_core.errors import ConfigError
from gemma_core.layout import roles_of
from gemma_core.model import Model

_ROWS = frozenset({"q", "k", "v", "gate", "up"})  # layout roles, [out, in]: split out
_COLUMNS = frozenset({"o", "down"})  # [out, in]: split in


def weight_spec(name: str, axis: str) -> PartitionSpec:
    """How one canonical weight is laid over the mesh axis `axis`, by its layout role. A fused
    weight (several roles; the jax backend does not fuse) is replicated."""
    roles = roles_of(name)
    if len(roles) == 1 and roles <= _ROWS:
        return PartitionSpec(axis, None)
    if len(roles) == 1 and roles <= _COLUMNS:
        return PartitionSpec(None, axis)
    return PartitionSpec()  # replicated: embeddings, norms, heads


def shard_model(model: Model, mesh: Mesh, axis: str = "tp") -> Model:
    """Place `model`'s weights over `mesh` (in place) and return the model."""
    if model.backend.name != "jax":
        raise ConfigError(f"shard_model: needs a jax model, got backend {model.backend.name!r}")
    size = mesh.shape[axis]
    c = model.config
    for what, value in (("num_kv_heads", c.num_kv_heads), ("intermediate_size", c.intermediate_size)):
        if value % size:
            raise ConfigError(f"mesh axis {axis!r}: {size} devices do not divide {what} {value}")
    model.weights = {name: jax.device_put(w, NamedSharding(mesh, weight_spec(name, axis)))
                     for name, w in model.weights.items()}
    model.ops = model.ops  # rebind the graph to the placed weights
    return model
