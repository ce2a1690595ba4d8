"""Control images made from plain pictures (``controlnets[i].preprocess``).

``canny``: OpenCV's Canny edges, what canny ControlNets were trained on. ``depth``: a depth map
from a depth estimator (``DEPTH_MODEL``, Depth Anything V2 Small by default: 25 M parameters),
run through transformers' depth-estimation pipeline, which scales it to 0-255, near bright, as
depth ControlNets take it. ``openpose``: the body skeletons of the people in it, drawn as
OpenPose draws them (what openpose ControlNets were trained on), from a person detector
(``PERSON_MODEL``, RT-DETR) and a pose estimator (``POSE_MODEL``, ViTPose) as transformers
documents the pair. The estimators are loaded on first use and stay on the device until
training needs the room. All work at the output size, where the ControlNet sees them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

from PIL import Image

from ..errors import ModelSourceError, first_line
from ..settings import Settings
from ..sources.files import hub_snapshot
from .components import Warm, quiet_libraries


def canny(image: Image.Image, low: int, high: int) -> Image.Image:
    """OpenCV's Canny edges of ``image``, white on black, as an RGB control image."""
    import cv2
    import numpy as np

    edges = cv2.Canny(np.asarray(image.convert("RGB")), low, high)
    return Image.fromarray(edges).convert("RGB")


class Depth:
    """The depth estimator, loaded once."""

    def __init__(self, settings: Settings, device: str):
        self.settings = settings
        self.device = device
        self.warm = Warm()

    def __call__(self, image: Image.Image, field: str) -> Image.Image:
        """``image``'s depth map, as an RGB control image of its size."""
        estimator, _ = self.warm.get(self.settings.depth_model, lambda: self._load(field))
        return estimator(image)["depth"].convert("RGB")

    def clear(self) -> None:
        """Free the device (for training)."""
        self.warm.clear()

    def _load(self, field: str) -> Any:
        from transformers import pipeline

        name = self.settings.depth_model
        return _loaded(name, "depth estimator DEPTH_MODEL", field, self.settings,
                       lambda folder: pipeline("depth-estimation", model=str(folder), device=self.device))


class Pose:
    """The person detector and the pose estimator, loaded once."""

    # Scores under these are not a person, or not a keypoint (transformers' ViTPose examples).
    PERSON_THRESHOLD = 0.3
    KEYPOINT_THRESHOLD = 0.3

    def __init__(self, settings: Settings, device: str):
        self.settings = settings
        self.device = device
        self.warm = Warm()

    def __call__(self, image: Image.Image, field: str) -> Image.Image:
        """The skeletons of the people in ``image``, drawn on black at its size."""
        return draw_pose(image.size, self.find(image, field))

    def find(self, image: Image.Image, field: str) -> list[dict[int, tuple[float, float]]]:
        """The people in ``image``: each one's COCO keypoints (index → x, y in pixels)."""
        key = (self.settings.person_model, self.settings.pose_model)
        models, _ = self.warm.get(key, lambda: self._load(field))
        return self.people(image.convert("RGB"), *models)

    def clear(self) -> None:
        """Free the device (for training)."""
        self.warm.clear()

    def people(self, image: Image.Image, detector: Any, detector_processor: Any, estimator: Any,
               estimator_processor: Any) -> list[dict[int, tuple[float, float]]]:
        """Each person's COCO keypoints (index → x, y in pixels) that the estimator is sure of."""
        import torch

        # 1. Find the people: boxes (x0, y0, x1, y1) of the detector's person class.
        with torch.inference_mode():
            inputs = detector_processor(images=image, return_tensors="pt").to(self.device)
            found = detector_processor.post_process_object_detection(
                detector(**inputs), target_sizes=[(image.height, image.width)], threshold=self.PERSON_THRESHOLD)[0]
            boxes = found["boxes"][found["labels"] == detector.person].cpu().numpy()
            if not len(boxes):
                return []
            # 2. Their keypoints, each from its box (COCO's x, y, width, height).
            boxes[:, 2:] -= boxes[:, :2]
            inputs = estimator_processor(image, boxes=[boxes], return_tensors="pt").to(self.device)
            if estimator.config.backbone_config.num_experts > 1:  # ViTPose+: pick its COCO head
                inputs["dataset_index"] = torch.zeros(len(boxes), dtype=torch.long, device=self.device)
            poses = estimator_processor.post_process_pose_estimation(
                estimator(**inputs), boxes=[boxes], threshold=self.KEYPOINT_THRESHOLD)[0]
        return [{int(label): (float(x), float(y)) for label, (x, y) in zip(pose["labels"], pose["keypoints"])}
                for pose in poses]

    def _load(self, field: str) -> tuple[Any, Any, Any, Any]:
        from transformers import AutoImageProcessor, AutoModelForObjectDetection, VitPoseForPoseEstimation

        def detector(folder: Path) -> tuple[Any, Any]:
            model = AutoModelForObjectDetection.from_pretrained(folder).to(self.device).eval()
            person = [i for i, label in model.config.id2label.items() if label == "person"]
            if not person:
                raise ValueError("it has no class labelled person")
            model.person = person[0]
            return model, AutoImageProcessor.from_pretrained(folder)

        def estimator(folder: Path) -> tuple[Any, Any]:
            model = VitPoseForPoseEstimation.from_pretrained(folder).to(self.device).eval()
            return model, AutoImageProcessor.from_pretrained(folder)

        return (*_loaded(self.settings.person_model, "person detector PERSON_MODEL", field, self.settings, detector),
                *_loaded(self.settings.pose_model, "pose estimator POSE_MODEL", field, self.settings, estimator))


def _loaded(name: str, what: str, field: str, settings: Settings, load: Callable[[Path], Any]) -> Any:
    """``load(folder)`` for a transformers model named by a hub id or a local directory; a
    failure answers for ``field``."""
    folder = Path(name) if name.startswith("/") else hub_snapshot(
        name, ["config.json", "preprocessor_config.json", "*.safetensors"], field, settings, lambda f: f)
    try:
        with quiet_libraries():
            return load(folder)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelSourceError(field, f"the {what}={name} could not be loaded "
                                      f"({type(exc).__name__}: {first_line(exc)})") from None


# OpenPose's 18 body points in its order, as COCO's 17 (ViTPose's) give them: nose, neck (the
# shoulders' midpoint), right shoulder, elbow, wrist, left shoulder, elbow, wrist, right hip,
# knee, ankle, left hip, knee, ankle, right eye, left eye, right ear, left ear.
_FROM_COCO = [0, None, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3]
# The 17 limbs it draws, and a colour per point and limb (ControlNet 1.1's openpose annotator).
LIMBS = [(1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12),
         (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17)]
COLORS = [(255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
          (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
          (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85)]


def openpose_points(coco: dict[int, tuple[float, float]]) -> list[tuple[float, float] | None]:
    """One person's 18 OpenPose points from its COCO keypoints; None where unknown."""
    points = [coco.get(i) if i is not None else None for i in _FROM_COCO]
    if 5 in coco and 6 in coco:
        points[1] = ((coco[5][0] + coco[6][0]) / 2, (coco[5][1] + coco[6][1]) / 2)
    return points


def draw_pose(size: tuple[int, int], people: list[dict[int, tuple[float, float]]]) -> Image.Image:
    """The people's skeletons on black, as ControlNet 1.1's annotator draws them: limbs as
    ellipses 4 px wide at a 512 px short side (scaled with it) dimmed to 60 %, then the points."""
    import cv2
    import numpy as np

    width, height = size
    stick = max(1, round(4 * min(width, height) / 512))
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    skeletons = [openpose_points(person) for person in people]
    for (a, b), color in zip(LIMBS, COLORS):
        for points in skeletons:
            if points[a] is None or points[b] is None:
                continue
            (xa, ya), (xb, yb) = points[a], points[b]
            length = math.hypot(xa - xb, ya - yb)
            angle = math.degrees(math.atan2(ya - yb, xa - xb))
            polygon = cv2.ellipse2Poly((int((xa + xb) / 2), int((ya + yb) / 2)), (int(length / 2), stick),
                                       int(angle), 0, 360, 1)
            cv2.fillConvexPoly(canvas, polygon, color)
    canvas = (canvas * 0.6).astype(np.uint8)
    for points in skeletons:
        for point, color in zip(points, COLORS):
            if point is not None:
                cv2.circle(canvas, (int(point[0]), int(point[1])), stick, color, thickness=-1)
    return Image.fromarray(canvas)
