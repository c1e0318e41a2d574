"""swarm: run big transformer models on a swarm of ordinary machines.

    from swarm import AutoDistributedModel
    model = AutoDistributedModel.from_pretrained("path/to/model", initial_peers=[...])

`AutoDistributedModel` is imported on first use, so that a server (`python -m swarm.server`) does not load the
client's dependencies.
"""

__version__ = "0.1.0"

__all__ = ["AutoDistributedModel", "__version__"]


def __getattr__(name: str):
    if name == "AutoDistributedModel":
        from swarm.client.auto import AutoDistributedModel

        return AutoDistributedModel
    raise AttributeError(f"module 'swarm' has no attribute {name!r}")
