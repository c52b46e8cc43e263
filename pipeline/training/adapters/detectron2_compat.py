"""A stand-in for detectron2's ``Instances`` (what ReLA's targets are) when detectron2 is absent."""

from __future__ import annotations

from typing import Any

import torch


class InstancesStandIn:
    """Minimal stand-in for ``detectron2.structures.Instances`` when detectron2 is absent.

    Holds ``image_size`` and named fields; supports attribute access, ``has``/``get``/``set``,
    ``get_fields``, ``len`` and ``.to(device)`` -- what GRES ``prepare_targets`` uses.
    """

    def __init__(self, image_size: tuple[int, int], **fields: Any) -> None:
        object.__setattr__(self, "_image_size", tuple(image_size))
        object.__setattr__(self, "_fields", dict(fields))

    @property
    def image_size(self) -> tuple[int, int]:
        return self._image_size

    def __getattr__(self, name: str) -> Any:
        fields = self.__dict__.get("_fields", {})
        if name in fields:
            return fields[name]
        raise AttributeError(f"Cannot find field '{name}' in the given Instances!")

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_"):
            object.__setattr__(self, name, value)
        else:
            self._fields[name] = value

    def set(self, name: str, value: Any) -> None:
        self._fields[name] = value

    def has(self, name: str) -> bool:
        return name in self._fields

    def get(self, name: str) -> Any:
        return self._fields[name]

    def get_fields(self) -> dict[str, Any]:
        return self._fields

    def to(self, *args: Any, **kwargs: Any) -> InstancesStandIn:
        moved = {k: (v.to(*args, **kwargs) if hasattr(v, "to") else v)
                 for k, v in self._fields.items()}
        return InstancesStandIn(self._image_size, **moved)

    def __len__(self) -> int:
        for v in self._fields.values():
            return len(v)
        raise NotImplementedError("Empty Instances does not support __len__!")

    def __repr__(self) -> str:
        return (f"Instances(num_instances={len(self)}, image_height={self._image_size[0]}, "
                f"image_width={self._image_size[1]}, fields=[{', '.join(self._fields)}])")


def make_instances(
    image_size: tuple[int, int], boxes: torch.Tensor, classes: torch.Tensor, masks: torch.Tensor
) -> Any:
    """ReLA's ``instances``: detectron2's own ``Instances``/``Boxes`` when it is installed (what
    GRES's ``prepare_targets`` gets there), else the stand-in with the same fields."""
    try:
        from detectron2.structures import Boxes, Instances
    except ImportError:
        return InstancesStandIn(image_size, gt_boxes=boxes, gt_classes=classes, gt_masks=masks)
    inst = Instances(image_size)
    inst.gt_boxes = Boxes(boxes)
    inst.gt_classes = classes
    inst.gt_masks = masks
    return inst

