"""Packaging facts that must agree across files: the Docker image's torch satisfies setup.cfg's range, so
`pip install -e .` in the image keeps the image's CUDA build (as the Dockerfile's comment says)."""
import configparser
import re
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent


def test_the_docker_images_torch_satisfies_setup_cfg():
    image = re.search(r"^FROM pytorch/pytorch:(\d+\.\d+\.\d+)-", (REPO / "Dockerfile").read_text(), re.M)
    assert image, "the Dockerfile starts from a pytorch/pytorch:<version>-... image"
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    torch = next(Requirement(line) for line in setup["options"]["install_requires"].split()
                 if line.startswith("torch"))
    assert Version(image.group(1)) in torch.specifier, (image.group(1), str(torch.specifier))
