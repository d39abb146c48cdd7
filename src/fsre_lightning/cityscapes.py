"""The Cityscapes label set every semantic part of the package speaks (docs/design.md 4.2).

Pseudo-labels, the segmentation decoder, the losses, mIoU, the synthetic scenes and the
colour maps all use the 19 Cityscapes *train ids* (0..18) with 255 as void. Label PNGs of the
published release store Cityscapes *label ids* (0..33); `LABEL_ID_TO_TRAIN_ID` maps them.
numpy only, so that data workers and the scene generator can import it cheaply.
"""

from __future__ import annotations

import numpy as np

NUM_CLASSES = 19
VOID = 255

# Train ids by name (the order of the Cityscapes benchmark).
(ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, TRAFFIC_LIGHT, TRAFFIC_SIGN, VEGETATION, TERRAIN,
 SKY, PERSON, RIDER, CAR, TRUCK, BUS, TRAIN, MOTORCYCLE, BICYCLE) = range(NUM_CLASSES)

# Train id -> class name, as the benchmark names them.
CLASS_NAMES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle")

# What a vehicle camera sees as flat ground (the camera-height scale fits a plane to these).
GROUND_CLASSES = (ROAD, SIDEWALK, TERRAIN)

# Cityscapes label id -> train id; every other label id is void.
_TRAIN_ID_OF_LABEL_ID = {7: ROAD, 8: SIDEWALK, 11: BUILDING, 12: WALL, 13: FENCE, 17: POLE,
                         19: TRAFFIC_LIGHT, 20: TRAFFIC_SIGN, 21: VEGETATION, 22: TERRAIN,
                         23: SKY, 24: PERSON, 25: RIDER, 26: CAR, 27: TRUCK, 28: BUS,
                         31: TRAIN, 32: MOTORCYCLE, 33: BICYCLE}
LABEL_ID_TO_TRAIN_ID = np.full(256, VOID, dtype=np.uint8)
for _label_id, _train_id in _TRAIN_ID_OF_LABEL_ID.items():
    LABEL_ID_TO_TRAIN_ID[_label_id] = _train_id

# RGB colour of each train id, the colours every segmentation paper shows.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70),
    (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)
