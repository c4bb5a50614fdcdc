"""How a request names what it needs resident, so Ray Serve can route it to a replica that has it.

The client sends `multiplexed_model_id` metadata (Ray Serve's key for model multiplexing): the
adapter's name, or for an inline recipe a hash of the recipe message (its deterministic bytes:
the same recipe from any client gives the same key). Requests for the base model send no key
and go to any replica: every replica has the base. The key only steers routing; each replica
computes it again from the request itself, so a wrong or missing key costs a load, never a
wrong answer.
"""

from __future__ import annotations

import hashlib

from adapter_fusion.v1 import adapter_fusion_pb2 as pb
from adapter_fusion.names import NAME

MULTIPLEXED_KEY = "multiplexed_model_id"  # Ray Serve's metadata key
APPLICATION_KEY = "application"  # Ray Serve's metadata key naming the application (needed only if the cluster runs several)
REPLICA_KEY = "adapter-fusion-replica"  # trailing metadata: the replica that served the call
LOADS_KEY = "adapter-fusion-loads"  # trailing metadata: adapter loads on that replica so far
RECIPE_PREFIX = "recipe:"  # ':' cannot occur in an adapter name, so a recipe key never equals a name


def routing_key(request: pb.GenerateRequest | pb.ScoreRequest) -> str:
    """The multiplexing key of a Generate or Score request; "" for the base model, or for a name
    no adapter can have (the call then gets its error from the server, not from grpc's metadata
    checks on the client)."""
    which = request.WhichOneof("target")
    if which == "adapter":
        return request.adapter if NAME.match(request.adapter) else ""
    if which == "recipe":
        return RECIPE_PREFIX + hashlib.sha256(request.recipe.SerializeToString(deterministic=True)).hexdigest()[:32]
    return ""


def adapters_of(request: pb.GenerateRequest | pb.ScoreRequest) -> list[str]:
    """The adapter names a Generate or Score request uses (a recipe's sources)."""
    which = request.WhichOneof("target")
    if which == "adapter":
        return [request.adapter]
    if which == "recipe":
        return [s.adapter for s in request.recipe.sources]
    return []
