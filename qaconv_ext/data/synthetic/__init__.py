"""The built-in synthetic camera network: two small re-id domains written as Market-1501 folders.

``make_synthetic_network(root)`` draws stylised pedestrians walking in groups through a network of
six cameras and writes, for two domains ``domain_a`` and ``domain_b``, real JPEG files in the
Market-1501 layout (``bounding_box_train``, ``query``, ``bounding_box_test``; names
``PPPP_cCsS_FFFFFF_NN.jpg``) so that :class:`~qaconv_ext.data.Market1501` reads them, time stamps
included.

What the images contain:

* **Identities** built from local parts: hair (style, colour), upper garment (colour, pattern:
  plain, stripes, two-tone split, chest band; sleeves), a small logo (shape, colour, position,
  front/back), lower garment (trousers, shorts, skirt; side stripe), shoes, bag (backpack,
  shoulder bag, handbag), height and build. Identities come in *families* of two or three that
  use the same three colours on different parts (red top/blue trousers vs blue top/red trousers),
  so the overall colour histogram is shared and only the spatial arrangement and the small local
  marks tell family members apart.
* **Pose and framing**: walking phase (legs, arms), front or back view per camera pass, random
  scale and horizontal/vertical offsets of the person in the box.
* **Occlusions**: pillars, objects covering the lower body, other pedestrians in front.
* **Cameras**: each camera has its own background scene, colour cast, brightness, contrast,
  saturation, blur, noise and JPEG quality. Both domains film the same kind of indoor site (each
  camera its own layout of walls, doors, signs and floor); domain A's cameras are bright, warm and
  clean, domain B's cooler, dimmer, blurrier, noisier and more compressed.
* **Time**: the six cameras form a graph (a ring plus two chords) with a transit time per edge.
  Groups of two to four people start at random times, pass through a random path of two to four
  cameras, stay a few seconds in view of each camera and reach the next one after the edge's
  transit time (scaled by the group's walking speed). Members of a group are seen in the same
  camera within seconds of each other. Frames are counted at 25 fps; each camera's recording is
  split into ``sessions_per_camera`` sessions whose frame counter restarts, and the session
  boundaries are placed so that Market-1501's cumulative-session rule recovers the exact times.

Splits per domain: ``num_train_ids`` training identities (all their images in
``bounding_box_train``); ``num_test_ids`` test identities whose groups get one or two query
cameras (one image per member per query camera in ``query``, the rest in ``bounding_box_test``,
always with a match in another camera); ``num_distractors`` gallery images of one-off people
(pid 0) and ``num_junk`` junk images (pid -1: background or badly cropped boxes). The two domains
have disjoint identities (domain A numbers 1-1499, domain B 1501-2999).

Caching: ``root/manifest.json`` records the generator version and every parameter. When it
matches and the image counts agree, nothing is regenerated. New data are written into a temporary
folder under ``root`` and moved into place, and the manifest is written last, so an interrupted
run never leaves a set that passes as complete.

Each domain folder also holds ``annotations.json``: the camera graph, the camera styles, the
groups (identities, path, entry times) and, per image, its identity, camera, time, group, view
and occlusion.
Modules: :mod:`.plan` draws everything but the pixels (identities, camera graph and styles, groups,
walks, splits, sessions, file names), :mod:`.render` draws the boxes (backgrounds, pedestrians,
occlusions, camera effects) and the contact sheet, :mod:`.cache` writes the Market-style folders,
the annotations and the manifest, and decides when a generated set can be reused.
"""
from .cache import load_annotations, make_synthetic_network
from .plan import GENERATOR_VERSION, SYNTHETIC_DEFAULTS, plan_synthetic_network
from .render import contact_sheet

__all__ = [
    "GENERATOR_VERSION",
    "SYNTHETIC_DEFAULTS",
    "make_synthetic_network",
    "plan_synthetic_network",
    "load_annotations",
    "contact_sheet",
]
