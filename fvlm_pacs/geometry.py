"""Patient-coordinate conventions shared by the DICOM, NIfTI and MONAI code paths.

DICOM (and highdicom's ``Volume.affine``) puts patient space in LPS: +x towards the patient's
left, +y posterior, +z head. NIfTI files and MONAI transforms (``Spacing``, ``MetaTensor``
affines) use RAS: +x right, +y anterior, +z head. The two differ only by the sign of x and y, so
one diagonal matrix converts an affine either way: ``LPS_TO_RAS @ affine_lps`` is RAS and
``LPS_TO_RAS @ affine_ras`` is LPS (the matrix is its own inverse).
"""

from __future__ import annotations

import numpy as np

LPS_TO_RAS: np.ndarray = np.diag([-1.0, -1.0, 1.0, 1.0])
"""4×4 homogeneous flip of x and y: LPS → RAS and, being its own inverse, RAS → LPS.

Read-only, since it is shared module state: an in-place edit by one caller would silently move
every other caller's volumes. ``LPS_TO_RAS @ affine`` returns a new, writable array.
"""
LPS_TO_RAS.setflags(write=False)
