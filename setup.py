"""Packaging for fvlm_pacs. ``pip install -e .[test]`` is all a developer needs."""

from glob import glob

from setuptools import find_packages, setup

setup(
    name="fvlm_pacs",
    version="0.1.0",
    description="Put the fVLM CT vision-language model into a hospital PACS (DICOM/DICOMweb).",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=find_packages(include=["fvlm_pacs", "fvlm_pacs.*"]),
    package_data={
        "fvlm_pacs": [
            "py.typed",
            "migrations/script.py.mako",
            "migrations/versions/*.py",
            "templates/*.html",
            # the demo model (`--model demo`), built by `fvlm-pacs model build-demo`
            "models/demo/*",
            "models/demo/segmentation/*",  # the builtin segmentation network
        ],
    },
    data_files=[("share/fvlm_pacs/mappings", sorted(glob("mappings/*")))],
    install_requires=[
        "pydicom>=3.0,<4",
        "pynetdicom>=3.0,<4",
        "highdicom>=0.28,<0.30",
        "numpy>=1.26",
        # fVLM: install torch first (README) so this range finds it and pulls no other build
        "torch>=2.4,<2.14",
        "monai>=1.4",
        "scipy>=1.11",  # connected components of the lesion counts (fvlm_pacs.model.lesions)
        "transformers>=4.44",
        "safetensors>=0.4",
        # decoders for the compressed transfer syntaxes the SCP accepts
        "pylibjpeg>=2.0",
        "pylibjpeg-libjpeg>=2.1",
        "pylibjpeg-openjpeg>=2.3",
        "python-gdcm>=3.0.24",
        "sqlalchemy>=2.0.28,<3",  # preserve_rowcount
        "alembic>=1.13",
        "psycopg[binary]>=3.1",
        "apscheduler>=3.10,<4",
        "pydantic>=2.6",
        "pydantic-settings>=2.4",
        "pyyaml>=6",
        "fastapi>=0.110",
        "uvicorn>=0.29",
        "jinja2>=3.1",  # the worklist page (autoescaped template)
        "pillow>=10",  # summary image (PNG + Secondary Capture)
        "python-multipart>=0.0.9",
        "prometheus-client>=0.20",
        "rich>=13",
        # export: STOW-RS client (and the HTTP library it and the export code use)
        "dicomweb-client>=0.61",  # timeout= on the client
        "requests>=2.31",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-timeout>=2.3",
            "httpx>=0.27",
            "requests>=2.31",
            "einops>=0.7",
            "hl7>=0.4.5",  # an independent parser reads what the HL7 export sent
        ],
        "dev": ["mypy>=1.10", "ruff>=0.5", "types-PyYAML", "types-requests"],
        "totalseg": ["TotalSegmentator>=2.4", "nibabel>=5"],
    },
    entry_points={"console_scripts": ["fvlm-pacs=fvlm_pacs.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Medical Science Apps.",
    ],
)
