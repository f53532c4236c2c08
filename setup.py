"""Package discovery: memstream/ and each top-level folder of the design, installed under the
memstream namespace (``pipelines/`` becomes ``memstream.pipelines``, its subpackages too). Every
folder with an ``__init__.py`` below them is a package; nothing is listed by hand."""

from setuptools import find_packages, setup

# Folder in the repository -> its package in the memstream namespace.
ROOTS = {"memstream": "memstream", "pipelines": "memstream.pipelines", "operators": "memstream.operators",
         "kernels": "memstream.kernels", "dags": "memstream.dags", "schemas": "memstream.schemas",
         "infra": "memstream.infra"}

packages, package_dir = [], {}
for folder, name in ROOTS.items():
    package_dir[name] = folder
    packages.append(name)
    for sub in find_packages(folder):
        packages.append(f"{name}.{sub}")
        package_dir[f"{name}.{sub}"] = f"{folder}/{sub.replace('.', '/')}"

setup(packages=packages, package_dir=package_dir)
