"""Packages: everything under gohgraph/, plus the repository's viz/ folder installed as gohgraph.viz
(so no top-level ``viz`` package lands in site-packages). Metadata lives in setup.cfg."""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["gohgraph", "gohgraph.*"]) + ["gohgraph.viz"],
    package_dir={"gohgraph.viz": "viz"},
    package_data={"gohgraph.viz": ["report.js", "report.css"]},  # inlined into the HTML report
)
