"""Pipeline operators (`sagellm.operators`): one operator per module, registered by name in `base`.

Importing the package imports every module in it, which registers the built-in operators for YAML and the DSL."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
