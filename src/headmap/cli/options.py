"""Options several commands share, declared once: model parallel placement (``--device-map``,
``--max-memory``, ``--offload-folder``) on ``scan``, ``steer``, ``eval``, ``tune``, ``compress`` and ``explain``.

Each is an ``Annotated`` type for a command's signature; :func:`placement` turns the three values into
the keyword arguments of :func:`headmap.models.load_model` (and of the library calls that pass them on).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

DeviceMap = Annotated[
    str | None,
    typer.Option(
        help="spread the layers over devices (accelerate): auto, balanced, sequential, or a JSON file of "
        "module -> device (cpu, disk, GPU index); --device is then not used"
    ),
]
MaxMemory = Annotated[
    str | None, typer.Option(help="per-device budgets for --device-map, e.g. 0=20GiB,1=20GiB,cpu=60GiB")
]
OffloadFolder = Annotated[
    Path | None, typer.Option(help="where --device-map puts disk-offloaded weights (default: a temporary folder)")
]


def placement(device_map: str | None, max_memory: str | None, offload_folder: Path | None) -> dict[str, Any]:
    """``device_map``, ``max_memory`` and ``offload_folder`` as keyword arguments of
    :func:`headmap.models.load_model` (checked there, before anything loads)."""
    return {"device_map": device_map, "max_memory": max_memory, "offload_folder": offload_folder}
