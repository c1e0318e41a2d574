"""swarm: run big transformer models on a swarm of ordinary machines.

    from swarm import AutoDistributedModel
    model = AutoDistributedModel.from_pretrained("path/to/model", initial_peers=[...])
"""

__version__ = "0.1.0"

from swarm.client.auto import AutoDistributedModel  # noqa: E402

__all__ = ["AutoDistributedModel", "__version__"]
