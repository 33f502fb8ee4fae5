"""Maps the top-level code folders into the one `sagellm` distribution (metadata lives in pyproject.toml).

`common/`, `backends/`, `runtime/`, `operators/`, `benchmarks/` and `graphs/` install as `sagellm.common`,
`sagellm.backends`, ... `sagellm.graphs`; `package-dir` in pyproject.toml says where each lives, and this file lists
the subpackages under their new names, which `packages.find` cannot do."""

from setuptools import find_packages, setup

MAPPED = ("common", "backends", "runtime", "operators", "benchmarks", "graphs")
packages = find_packages(include=["sagellm", "sagellm.*"])
for top in MAPPED:
    packages += [f"sagellm.{top}"] + [f"sagellm.{top}.{sub}" for sub in find_packages(top)]

setup(packages=packages, package_data={"sagellm": ["py.typed"]})
