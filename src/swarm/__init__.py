"""swarm: run big transformer models on a swarm of ordinary machines.

    from swarm import AutoDistributedModel
    model = AutoDistributedModel.from_pretrained("path/to/model", initial_peers=[...])

`swarm.publish(model_dir, name, initial_peers=[...])` publishes a model to the swarm and seeds it;
`swarm.fetch(name, initial_peers=[...], output=DIR)` downloads one (see those modules, also command lines).
They and `AutoDistributedModel` are imported on first use, so that a server (`python -m swarm.server`) does not
load the client's dependencies.
"""

import importlib
import sys
import types

__version__ = "0.1.0"

__all__ = ["AutoDistributedModel", "fetch", "publish", "__version__"]


def __getattr__(name: str):
    if name == "AutoDistributedModel":
        from swarm.client.auto import AutoDistributedModel

        return AutoDistributedModel
    if name in ("publish", "fetch"):
        return importlib.import_module(f"swarm.{name}")  # a callable module
    raise AttributeError(f"module 'swarm' has no attribute {name!r}")


def make_module_callable(module_name: str, function):
    """Lets `swarm.NAME(...)` call `function`, while `python -m swarm.NAME` still runs that module's `main`."""

    class CallableModule(types.ModuleType):
        def __call__(self, *args, **kwargs):
            return function(*args, **kwargs)

    CallableModule.__call__.__doc__ = function.__doc__
    sys.modules[module_name].__class__ = CallableModule
