"""Synthetic faces: the embedded default data set (SPEC section 5).

An identity is a set of latent parameters (head shape, feature placement and size, colours, skin
texture, marks, hair, glasses). Identities come in look-alike *families* of `family_size`: members
share the family's colours and head shape and draw their features near the family's, so that a
family member is a hard negative. Every image adds its own nuisance: pose (roll, yaw, pitch,
scale, shift), expression (smile, open mouth, eye opening, brow raise, gaze), illumination
(directional shading, colour cast, gradient), background, occlusion, blur, noise and JPEG.

Determinism: identity latents come from `SeedSequence([seed, tag, identity])` and the nuisance of
image `index` from `SeedSequence([seed, tag, identity, index])`, and rendering is elementwise per
image, so the same (seed, identity, index) gives the same pixels in any batch, order or process.

Rendering is vectorised over a batch with numpy, in planar float32 (3, B, H, W). The layers that
cover the whole crop (background, neck, hair, face, fringe) are composited in one pass; every
smaller feature is a soft mask evaluated only in the window of the image that can hold it (the
union over the batch). A mask is exactly zero outside its support, so the window (which depends
on the batch) never changes a pixel. Shading, texture and beard gather in one brightness map.
Blur and JPEG use Pillow; the JPEG bytes are what the writers store and what `render` decodes.

Held-out split: see SyntheticBenchmark (verification identities start at the first family
boundary after the training identities, so neither identities nor families are shared).
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageFilter

from toolchain.data.codec import decode_image
from toolchain.data.pairs import VerificationPairs
from toolchain.errors import ToolchainError

SIZE = 112
_F = np.float32
# Tags that keep the random streams of families, identities, images and pairs apart.
_TAG_FAMILY, _TAG_IDENTITY, _TAG_IMAGE, _TAG_PAIRS = 1, 2, 3, 4
_PX = 2.0 / SIZE  # one pixel in image coordinates ([-1, 1] across the crop)
_GRID = ((np.arange(SIZE, dtype=np.float64) + 0.5) * _PX - 1.0).astype(_F)


# --------------------------------------------------------------------------------------------
# Latent parameters


@dataclass(frozen=True)
class IdentityParams:
    """Latents of one identity; coordinates are canonical face units (head half-height ~0.6)."""

    identity: int
    family: int
    skin: tuple  # RGB 0..255
    hair: tuple
    iris: tuple
    lip: tuple
    brow: tuple
    face_w: float
    face_h: float
    jaw: float
    face_v: float
    hair_vol: float
    hair_len: float
    hairline: float
    hairline_curv: float
    part: float
    eye_dx: float
    eye_v: float
    eye_w: float
    eye_h: float
    iris_r: float
    brow_dx: float
    brow_v: float
    brow_len: float
    brow_th: float
    brow_curv: float
    brow_tilt: float
    nose_v: float
    nose_w: float
    nose_len: float
    mouth_v: float
    mouth_w: float
    lip_th: float
    mouth_curv: float
    tex_f1: tuple  # (fu, fv, phase)
    tex_f2: tuple
    tex_amp: float
    moles: tuple  # ((u, v, r), ...)
    beard: float  # 0 = none, else darkness
    beard_top: float
    glasses: int  # 0 none, 1 glasses
    glasses_col: tuple


def _skin_tone(t: float, warm: float) -> np.ndarray:
    # Interpolate along a light-to-dark skin axis, with a warm/cool shift.
    light = np.array([236.0, 200.0, 172.0])
    dark = np.array([92.0, 58.0, 40.0])
    c = light + (dark - light) * t
    return c + np.array([8.0, 0.0, -10.0]) * warm


_HAIR = np.array(
    [[20, 16, 14], [55, 38, 26], [96, 66, 40], [150, 110, 64], [200, 170, 110], [120, 50, 28],
     [170, 170, 170], [80, 80, 84]],
    dtype=np.float64,
)
_IRIS = np.array(
    [[60, 40, 25], [100, 70, 40], [70, 110, 150], [80, 120, 80], [40, 30, 25], [120, 110, 80]],
    dtype=np.float64,
)


def _family_latents(seed: int, family: int) -> dict:
    r = np.random.default_rng([seed, _TAG_FAMILY, family])
    return dict(
        skin_t=r.uniform(0.0, 1.0), skin_warm=r.uniform(-1, 1),
        hair=_HAIR[r.integers(len(_HAIR))] + r.normal(0, 10, 3),
        iris=_IRIS[r.integers(len(_IRIS))] + r.normal(0, 10, 3),
        face_w=r.uniform(0.66, 0.84), face_h=r.uniform(0.95, 1.12), jaw=r.uniform(0.05, 0.45),
        hair_vol=r.uniform(1.0, 1.25), hair_len=r.uniform(0.0, 1.0), hairline=r.uniform(-0.62, -0.40),
        eye_dx=r.uniform(0.27, 0.37), eye_v=r.uniform(-0.16, -0.04), eye_w=r.uniform(0.10, 0.15),
        brow_th=r.uniform(0.025, 0.06), nose_len=r.uniform(0.24, 0.40), mouth_w=r.uniform(0.17, 0.30),
        lip=r.uniform(0, 1),
    )


def _identity_latents(seed: int, identity: int, family_size: int, spread: float) -> IdentityParams:
    family = identity // family_size
    f = _family_latents(seed, family)
    r = np.random.default_rng([seed, _TAG_IDENTITY, identity])

    def near(key: float, width: float) -> float:
        # A member's value is the family's plus a deviation: `spread` sets how alike they look.
        return float(key + r.normal(0.0, width * spread))

    skin = _skin_tone(float(np.clip(near(f["skin_t"], 0.06), 0, 1)), f["skin_warm"])
    hair = np.clip(f["hair"] + r.normal(0, 8 * spread, 3), 5, 230)
    iris = np.clip(f["iris"] + r.normal(0, 12, 3), 5, 230)
    lip_base = skin * np.array([0.85, 0.55, 0.55]) + np.array([30.0, 0, 0])
    lip = np.clip(lip_base * (0.85 + 0.25 * f["lip"]) + r.normal(0, 10, 3), 20, 240)
    brow = np.clip(hair * r.uniform(0.6, 1.0), 5, 200)
    n_moles = int(r.choice([0, 1, 1, 2, 2, 3]))
    moles = tuple(
        (float(r.uniform(-0.42, 0.42)), float(r.uniform(-0.35, 0.55)), float(r.uniform(0.02, 0.04)))
        for _ in range(n_moles)
    )
    beard = float(r.uniform(0.2, 0.45)) if r.random() < 0.3 else 0.0
    glasses = int(r.random() < 0.2)
    return IdentityParams(
        identity=identity, family=family,
        skin=tuple(skin), hair=tuple(hair), iris=tuple(iris), lip=tuple(lip), brow=tuple(brow),
        face_w=near(f["face_w"], 0.025), face_h=near(f["face_h"], 0.025), jaw=near(f["jaw"], 0.06),
        face_v=float(r.uniform(-0.03, 0.03)),
        hair_vol=near(f["hair_vol"], 0.05), hair_len=float(np.clip(near(f["hair_len"], 0.2), 0, 1)),
        hairline=near(f["hairline"], 0.05), hairline_curv=float(r.uniform(0.0, 0.5)),
        part=float(r.uniform(-0.3, 0.3)),
        eye_dx=near(f["eye_dx"], 0.025), eye_v=near(f["eye_v"], 0.03), eye_w=near(f["eye_w"], 0.015),
        eye_h=float(r.uniform(0.35, 0.6)), iris_r=float(r.uniform(0.45, 0.7)),
        brow_dx=float(r.uniform(0.0, 0.05)), brow_v=float(r.uniform(0.11, 0.2)),
        brow_len=float(r.uniform(0.1, 0.17)), brow_th=near(f["brow_th"], 0.008),
        brow_curv=float(r.uniform(-1.0, 3.0)), brow_tilt=float(r.uniform(-0.35, 0.35)),
        nose_v=float(r.uniform(-0.02, 0.06)), nose_w=float(r.uniform(0.07, 0.13)),
        nose_len=near(f["nose_len"], 0.04),
        mouth_v=float(r.uniform(0.0, 0.1)), mouth_w=near(f["mouth_w"], 0.03),
        lip_th=float(r.uniform(0.035, 0.07)), mouth_curv=float(r.uniform(-1.5, 2.5)),
        tex_f1=(float(r.uniform(-40, 40)), float(r.uniform(-40, 40)), float(r.uniform(0, 6.28))),
        tex_f2=(float(r.uniform(-40, 40)), float(r.uniform(-40, 40)), float(r.uniform(0, 6.28))),
        tex_amp=float(r.uniform(0.03, 0.09)),
        moles=moles, beard=beard, beard_top=float(r.uniform(0.35, 0.55)),
        glasses=glasses, glasses_col=tuple(np.clip(r.uniform(10, 160) + r.normal(0, 20, 3), 0, 255)),
    )


# Nuisance fields drawn per image (all float; see _nuisance).
_NUISANCE_KEYS = (
    "roll", "yaw", "pitch", "scale", "tx", "ty", "smile", "open", "eye_open", "brow_raise",
    "gaze_u", "gaze_v", "lx", "ly", "amb", "gain_r", "gain_g", "gain_b", "grad_x", "grad_y",
    "bright", "bg_r0", "bg_g0", "bg_b0", "bg_r1", "bg_g1", "bg_b1", "bg_ang",
    "occ", "occ_u", "occ_v", "occ_w", "occ_h", "occ_r", "occ_g", "occ_b",
    "blur", "noise", "jpeg",
)


def _nuisance(rng: np.random.Generator, strength: float) -> dict:
    s = strength
    u = rng.random
    blink = u() < 0.08
    occ_kind = 0.0

    def bg():  # background colour channel: uniform over 0..255 at full strength, grey at 0
        return 128.0 + (u() - 0.5) * 255.0 * min(s, 1.0)

    if u() < 0.25 * min(s, 1.0):
        occ_kind = float(rng.integers(1, 5))  # 1 object, 2 sunglasses, 3 mask, 4 hat
    return dict(
        roll=rng.normal(0, 0.10 * s), yaw=rng.uniform(-0.45, 0.45) * s, pitch=rng.uniform(-0.25, 0.25) * s,
        scale=1.0 + rng.uniform(-0.10, 0.08) * s, tx=rng.uniform(-0.08, 0.08) * s, ty=rng.uniform(-0.07, 0.07) * s,
        smile=rng.uniform(-1, 3) * s, open=max(0.0, rng.uniform(-0.6, 1.0)) * s,
        eye_open=0.1 if blink and s > 0 else 1.0 + rng.uniform(-0.35, 0.2) * s,
        brow_raise=rng.uniform(-0.02, 0.04) * s, gaze_u=rng.uniform(-0.5, 0.5) * s, gaze_v=rng.uniform(-0.3, 0.3) * s,
        lx=rng.uniform(-0.9, 0.9) * s, ly=rng.uniform(-0.7, 0.5) * s, amb=1.0 - rng.uniform(0.0, 0.45) * s,
        gain_r=1.0 + rng.uniform(-0.3, 0.3) * s, gain_g=1.0 + rng.uniform(-0.25, 0.25) * s,
        gain_b=1.0 + rng.uniform(-0.35, 0.35) * s,
        grad_x=rng.uniform(-0.35, 0.35) * s, grad_y=rng.uniform(-0.35, 0.35) * s,
        bright=1.0 + rng.uniform(-0.3, 0.25) * s,
        bg_r0=bg(), bg_g0=bg(), bg_b0=bg(), bg_r1=bg(), bg_g1=bg(), bg_b1=bg(),
        bg_ang=u() * 6.2832,
        occ=occ_kind, occ_u=rng.uniform(-0.6, 0.6), occ_v=rng.uniform(-0.5, 0.7), occ_w=rng.uniform(0.12, 0.3),
        occ_h=rng.uniform(0.12, 0.35), occ_r=u() * 255, occ_g=u() * 255, occ_b=u() * 255,
        blur=rng.uniform(0.2, 1.6) * s if u() < 0.5 else 0.0,
        noise=rng.uniform(0.0, 9.0) * s,
        jpeg=float(np.clip(95 - rng.uniform(0, 60) * s, 5, 95)),
    )


# --------------------------------------------------------------------------------------------
# Rendering


def _col(a) -> np.ndarray:
    """(B,) -> (B,1,1) float32 for broadcasting over a window."""
    return np.asarray(a, dtype=_F).reshape(-1, 1, 1)


class _Canvas:
    """A batch of images under construction plus the canonical coordinates of every pixel."""

    def __init__(self, n: dict):
        b = len(n["roll"])
        self.b = b
        self.cos = np.cos(n["roll"]).astype(_F)
        self.sin = np.sin(n["roll"]).astype(_F)
        self.scale = n["scale"].astype(_F)
        self.tx, self.ty = n["tx"].astype(_F), n["ty"].astype(_F)
        x = _GRID.reshape(1, 1, SIZE) - _col(self.tx)
        y = _GRID.reshape(1, SIZE, 1) - _col(self.ty)
        inv = 1.0 / _col(self.scale)
        # Inverse pose: image (X, Y) -> canonical face (u, v).
        self.u = (_col(self.cos) * x + _col(self.sin) * y) * inv
        self.v = (_col(self.cos) * y - _col(self.sin) * x) * inv
        # Planar (3, B, H, W): every blend works on contiguous rows of one channel.
        self.img = np.empty((3, b, SIZE, SIZE), dtype=_F)
        self.light = np.ones((b, SIZE, SIZE), dtype=_F)
        # Edge width of soft masks: about 1.2 pixels, in canonical units.
        self.edge = _col(1.2 * _PX / self.scale)

    def window(self, cu, cv, radius):
        """Slices of the smallest image window holding discs (cu, cv, radius) of every image."""
        cu, cv, radius = (np.broadcast_to(np.asarray(a, dtype=np.float64), (self.b,)) for a in (cu, cv, radius))
        x = self.scale * (self.cos * cu - self.sin * cv) + self.tx
        y = self.scale * (self.sin * cu + self.cos * cv) + self.ty
        r = self.scale * radius
        lo_x, hi_x = (x - r + 1) / _PX - 0.5, (x + r + 1) / _PX - 0.5
        lo_y, hi_y = (y - r + 1) / _PX - 0.5, (y + r + 1) / _PX - 0.5
        x0 = int(np.clip(math.floor(lo_x.min()) - 1, 0, SIZE))
        x1 = int(np.clip(math.ceil(hi_x.max()) + 2, 0, SIZE))
        y0 = int(np.clip(math.floor(lo_y.min()) - 1, 0, SIZE))
        y1 = int(np.clip(math.ceil(hi_y.max()) + 2, 0, SIZE))
        return slice(y0, max(y0, y1)), slice(x0, max(x0, x1))

    def uv(self, win):
        ys, xs = win
        return self.u[:, ys, xs], self.v[:, ys, xs]

    def blend(self, win, mask, colour):
        """Alpha-blend colour (B,3) into the window with mask (B,h,w); zero mask leaves pixels."""
        ys, xs = win
        col = np.asarray(colour, dtype=_F).reshape(-1, 3)
        for ch in range(3):
            dst = self.img[ch, :, ys, xs]
            tmp = np.subtract(col[:, ch].reshape(-1, 1, 1), dst)
            tmp *= mask
            dst += tmp

    def scale_by(self, win, factor):
        """Multiply the light map in the window by factor (B,h,w) (1 = unchanged).

        Shading, texture and beard only scale brightness, so they gather in one 1-channel map
        that multiplies the image once at the end."""
        ys, xs = win
        self.light[:, ys, xs] *= factor


def _soft(d, k):
    """Soft inside-mask from a normalised squared distance d (<1 inside): exactly 0 outside."""
    m = (1.0 - d) * k
    np.clip(m, 0.0, 1.0, out=m)
    return m


def _ellipse(cv_: _Canvas, cu, cv, ru, rv, win=None, ang=None):
    """Mask of an ellipse centred at (cu, cv) with radii (ru, rv), optionally rotated by ang."""
    cu, cv, ru, rv = (_col(a) for a in (cu, cv, ru, rv))
    if win is None:
        win = cv_.window(cu.ravel(), cv.ravel(), np.maximum(ru, rv).ravel())
    u, v = cv_.uv(win)
    du, dv = u - cu, v - cv
    if ang is not None:
        c, s = _col(np.cos(ang)), _col(np.sin(ang))
        du, dv = c * du + s * dv, c * dv - s * du
    d = (du / ru) ** 2 + (dv / rv) ** 2
    return win, _soft(d, np.minimum(ru, rv) / (2 * cv_.edge))


def _arc(cv_: _Canvas, cu, cv, half_len, half_th, curv, tilt, mirror=1.0):
    """A band bent along the parabola v = cv + curv*a^2 + tilt*a (brows, lips)."""
    cu, cv, L, T, C, tl = (_col(a) for a in (cu, cv, half_len, half_th, curv, tilt))
    reach = np.sqrt(L**2 + (T + np.abs(C) * L**2 + np.abs(tl) * L) ** 2)
    win = cv_.window(cu.ravel(), cv.ravel(), reach.ravel())
    u, v = cv_.uv(win)
    a = (u - cu) * _F(mirror)
    b = v - cv - C * a * a - tl * a
    d = (a / L) ** 2 + (b / T) ** 2
    return win, _soft(d, T / (2 * cv_.edge))


def _stack(params: list[IdentityParams], nuis: list[dict]):
    p = {k: np.array([getattr(q, k) for q in params], dtype=np.float64) for k in (
        "face_w", "face_h", "jaw", "face_v", "hair_vol", "hair_len", "hairline", "hairline_curv", "part",
        "eye_dx", "eye_v", "eye_w", "eye_h", "iris_r", "brow_dx", "brow_v", "brow_len", "brow_th",
        "brow_curv", "brow_tilt", "nose_v", "nose_w", "nose_len", "mouth_v", "mouth_w", "lip_th",
        "mouth_curv", "tex_amp", "beard", "beard_top", "glasses")}
    for k in ("skin", "hair", "iris", "lip", "brow", "glasses_col", "tex_f1", "tex_f2"):
        p[k] = np.array([getattr(q, k) for q in params], dtype=np.float64)
    n = {k: np.array([d[k] for d in nuis], dtype=np.float64) for k in _NUISANCE_KEYS}
    return p, n


def _render_float(params: list[IdentityParams], nuis: list[dict]) -> np.ndarray:
    """Render a batch to planar float32 (3,B,112,112) in 0..255 before noise, blur and JPEG."""
    p, n = _stack(params, nuis)
    c = _Canvas(n)
    b = c.b
    cy, sy = np.cos(n["yaw"]), np.sin(n["yaw"])
    sp = np.sin(n["pitch"])

    def proj_u(u0, depth):  # yaw moves features by their depth and foreshortens them
        return u0 * cy + depth * sy

    def proj_v(v0, depth):
        return v0 + depth * sp

    fw = p["face_w"] * (0.82 + 0.18 * cy)
    fh = p["face_h"]
    fu = proj_u(0.0, -0.06)  # the head's centre sits behind the face plane
    fv = p["face_v"] + proj_v(0.0, -0.06)

    # The base layers cover (nearly) the whole crop, so they are composited in one pass over
    # the full image: background gradient, neck, hair behind the head, face, fringe.
    fwin = (slice(0, SIZE), slice(0, SIZE))
    _, neck = _ellipse(c, fu * 0.5, fv + fh * 0.95, fw * 0.55, fh * 0.55, win=fwin)
    hair_rv = fh * (1.0 + 0.35 * p["hair_len"])
    _, hair = _ellipse(c, fu, fv - fh * 0.08 + 0.15 * fh * p["hair_len"], fw * p["hair_vol"], hair_rv * 1.02,
                       win=fwin)
    # Face: an ellipse whose lower half narrows towards the chin (jaw).
    u, v = c.uv(fwin)
    a = (u - _col(fu)) / _col(fw)
    bb = (v - _col(fv)) / _col(fh)
    a = a / (1.0 - _col(p["jaw"]) * np.maximum(bb, 0.0))
    face = _soft(a * a + bb * bb, _col(np.minimum(fw, fh)) / (2 * c.edge))
    # Fringe: hair over the forehead above an identity hairline with a parting.
    uu = u - _col(fu)
    hl = _col(fv + p["hairline"] * fh) + _col(p["hairline_curv"]) * uu * uu + _col(p["part"]) * uu * np.abs(uu)
    fringe = np.clip((hl - v) / (2 * c.edge), 0, 1)
    # Weights of background, neck, hair and skin (successive alpha compositing, folded).
    q = 1.0 - face
    qh = q * (1.0 - hair)
    w_neck = neck * qh
    w_bg = qh - w_neck
    ff = face * fringe
    w_hair = hair * q + ff
    w_skin = face - ff
    g = (_col(np.cos(n["bg_ang"])) * _GRID[None, None, :] + _col(np.sin(n["bg_ang"])) * _GRID[None, :, None])
    g = (g * 0.5 + 0.5) * w_bg
    bg0 = np.stack([n["bg_r0"], n["bg_g0"], n["bg_b0"]])
    bg1 = np.stack([n["bg_r1"], n["bg_g1"], n["bg_b1"]])
    for ch in range(3):
        out = c.img[ch]
        np.multiply(w_bg, _col(bg0[ch]), out=out)
        out += g * _col(bg1[ch] - bg0[ch])
        out += w_neck * _col(p["skin"][:, ch] * 0.8)
        out += w_hair * _col(p["hair"][:, ch])
        out += w_skin * _col(p["skin"][:, ch])

    # Skin texture: a product of two identity-specific gratings.
    f1, f2 = p["tex_f1"], p["tex_f2"]
    t = np.sin(_col(f1[:, 0]) * u + _col(f1[:, 1]) * v + _col(f1[:, 2]))
    t *= np.sin(_col(f2[:, 0]) * u + _col(f2[:, 1]) * v + _col(f2[:, 2]))
    c.scale_by(fwin, 1.0 + face * t * _col(p["tex_amp"]))

    # Beard / stubble: darkens the lower face below beard_top.
    has_beard = p["beard"] > 0
    if has_beard.any():
        lower = np.clip((v - _col(fv + p["beard_top"] * fh)) * _col(1.0 / (3 * c.edge.ravel())), 0, 1)
        c.scale_by(fwin, 1.0 - face * lower * _col(p["beard"]))

    # Moles.
    for j in range(3):
        has = np.array([len(q.moles) > j for q in params])
        if not has.any():
            continue
        mu = np.array([q.moles[j][0] if len(q.moles) > j else 0.0 for q in params])
        mv = np.array([q.moles[j][1] if len(q.moles) > j else 0.0 for q in params])
        mr = np.array([q.moles[j][2] if len(q.moles) > j else 1e-3 for q in params])
        mr = np.where(has, mr, 1e-6)
        win, m = _ellipse(c, proj_u(mu * fw / 0.5, 0.1), fv + proj_v(mv * fh / 0.7, 0.1), mr * cy, mr)
        c.blend(win, m * _col(has.astype(_F)), p["skin"] * 0.45)

    eye_u_off = proj_u(0.0, 0.12)
    ev = fv + proj_v(p["eye_v"], 0.12)
    for side in (-1.0, 1.0):
        eu = side * p["eye_dx"] * cy + eye_u_off
        # Brows (raised by expression).
        bu = eu + side * p["brow_dx"] * cy
        bv = ev - p["brow_v"] - n["brow_raise"]
        win, m = _arc(c, bu, bv, p["brow_len"] * cy, p["brow_th"] * 0.5, p["brow_curv"] / cy, p["brow_tilt"], side)
        c.blend(win, m, p["brow"])
        # Eye socket shadow, sclera, iris, pupil.
        ew = p["eye_w"] * (0.75 + 0.25 * cy) * (1 + 0.15 * side * sy)
        eh = p["eye_w"] * p["eye_h"] * np.maximum(n["eye_open"], 0.05)
        win, m = _ellipse(c, eu, ev, ew * 1.35, np.maximum(eh, p["eye_w"] * 0.2) * 1.7)
        c.blend(win, m * 0.35, p["skin"] * 0.55)
        win, sclera = _ellipse(c, eu, ev, ew, eh)
        c.blend(win, sclera, np.full((b, 3), 235.0))
        ir = p["eye_w"] * p["iris_r"]
        iu = eu + n["gaze_u"] * ew * 0.45
        iv = ev + n["gaze_v"] * eh * 0.4
        _, iris = _ellipse(c, iu, iv, ir * cy, ir, win=win)
        c.blend(win, iris * sclera, p["iris"])
        _, pupil = _ellipse(c, iu, iv, ir * 0.45 * cy, ir * 0.45, win=win)
        c.blend(win, pupil * sclera, np.full((b, 3), 12.0))

    # Nose: a side shadow along the bridge, the tip, nostrils.
    nu = proj_u(0.0, 0.32)
    nv_tip = fv + proj_v(p["nose_v"] + p["nose_len"] * 0.8, 0.32)
    win, m = _ellipse(c, nu - 0.5 * p["nose_w"] * np.sign(n["lx"] + 1e-6) + 0.0 * sy,
                      fv + proj_v(p["nose_v"] + p["nose_len"] * 0.35, 0.25),
                      p["nose_w"] * 0.35, p["nose_len"] * 0.6)
    c.blend(win, m * 0.3, p["skin"] * 0.6)
    win, m = _ellipse(c, nu, nv_tip, p["nose_w"] * 0.7 * cy, p["nose_w"] * 0.5)
    c.blend(win, m * 0.25, np.minimum(p["skin"] * 1.15, 255))
    for side in (-1.0, 1.0):
        win, m = _ellipse(c, nu + side * p["nose_w"] * 0.55 * cy, nv_tip + p["nose_w"] * 0.35,
                          p["nose_w"] * 0.28 * cy, p["nose_w"] * 0.16)
        c.blend(win, m * 0.8, p["skin"] * 0.35)

    # Mouth: lips bent by the identity's curve plus the smile; open mouths show a dark gap.
    mu_ = proj_u(0.0, 0.2)
    mv_ = fv + proj_v(p["nose_v"] + p["nose_len"] + 0.2 + p["mouth_v"], 0.2)
    mw = p["mouth_w"] * (0.7 + 0.3 * cy) * (1 + 0.08 * n["smile"])
    curv = -(p["mouth_curv"] + n["smile"]) * 0.25
    th = p["lip_th"] * 0.5 + n["open"] * 0.04
    win, m = _arc(c, mu_, mv_, mw, th, curv, 0.0)
    c.blend(win, m, p["lip"])
    if (n["open"] > 0).any():
        win, m = _arc(c, mu_, mv_, mw * 0.8, np.maximum(n["open"] * 0.04, 1e-4), curv, 0.0)
        c.blend(win, m * _col((n["open"] > 0).astype(_F)), np.full((b, 3), 30.0))

    # Glasses: two rings and a bridge.
    if (p["glasses"] > 0).any():
        gm = _col(p["glasses"].astype(_F))
        for side in (-1.0, 1.0):
            eu = side * p["eye_dx"] * cy + eye_u_off
            ro, rvv = p["eye_w"] * 1.6 * (0.75 + 0.25 * cy), p["eye_w"] * 1.25
            win, outer = _ellipse(c, eu, ev + 0.01, ro, rvv)
            _, inner = _ellipse(c, eu, ev + 0.01, ro - 0.022, rvv - 0.022, win=win)
            c.blend(win, (outer - np.minimum(inner, outer)) * gm, p["glasses_col"])
        win, m = _ellipse(c, eye_u_off, ev - 0.01, p["eye_dx"] * cy - p["eye_w"] * 1.4, np.full(b, 0.01))
        c.blend(win, m * gm, p["glasses_col"])

    # Directional light on the head (a Lambertian ellipsoid), applied inside the face.
    a2 = np.clip(a * a + bb * bb, 0.0, 1.0)
    nz = np.sqrt(1.0 - a2)
    lx, ly = _col(n["lx"]), _col(n["ly"])
    lz = np.sqrt(np.maximum(1.0 - lx * lx - ly * ly, 0.05))
    lam = np.maximum(a * lx + bb * ly + nz * lz, 0.0)
    amb = _col(n["amb"])
    shade = amb + (1.0 - amb) * lam * 1.25
    c.scale_by(fwin, 1.0 + face * (shade - 1.0))

    # Global illumination: colour cast, brightness, linear gradient.
    gain = (np.stack([n["gain_r"], n["gain_g"], n["gain_b"]], 1) * n["bright"][:, None]).astype(_F)
    grad = 1.0 + (_col(n["grad_x"]) * _GRID[None, None, :] + _col(n["grad_y"]) * _GRID[None, :, None])
    c.light *= grad
    for ch in range(3):
        c.img[ch] *= c.light * _col(gain[:, ch])

    # Occlusion (per image: the kinds differ).
    for i in np.nonzero(n["occ"] > 0)[0]:
        kind = int(n["occ"][i])
        col = np.array([n["occ_r"][i], n["occ_g"][i], n["occ_b"][i]], dtype=_F)
        if kind == 1:  # an object (hand, phone, cup) somewhere over the face
            x0, y0 = n["occ_u"][i], n["occ_v"][i]
            w, h = n["occ_w"][i], n["occ_h"][i]
        elif kind == 2:  # sunglasses band over the eyes
            col = col * 0.15
            x0, y0, w, h = c.tx[i] + fu[i] * c.scale[i], c.ty[i] + ev[i] * c.scale[i], fw[i] * 0.9, 0.09
        elif kind == 3:  # a mask over the mouth and nose
            x0, y0, w, h = c.tx[i], c.ty[i] + 0.38 * c.scale[i], fw[i] * 0.95, 0.28
        else:  # a hat brim over the forehead
            x0, y0, w, h = c.tx[i], c.ty[i] - 0.62 * c.scale[i], fw[i] * 1.3, 0.22
        xs = slice(max(0, int((x0 - w + 1) / _PX)), min(SIZE, int((x0 + w + 1) / _PX) + 1))
        ys = slice(max(0, int((y0 - h + 1) / _PX)), min(SIZE, int((y0 + h + 1) / _PX) + 1))
        c.img[:, i, ys, xs] = col.reshape(3, 1, 1)
    return c.img


def _finish(img: np.ndarray, nuis: dict, rng: np.random.Generator) -> bytes:
    """Noise, blur and JPEG for one image; returns the JPEG bytes."""
    if nuis["noise"] > 0:
        img = img + (rng.random((SIZE, SIZE, 3), dtype=_F) - 0.5) * _F(nuis["noise"] * 3.46)
    u8 = np.ascontiguousarray(np.clip(img + 0.5, 0, 255), dtype=np.uint8)
    im = Image.fromarray(u8, "RGB")
    if nuis["blur"] > 0:
        im = im.filter(ImageFilter.GaussianBlur(float(nuis["blur"])))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=int(round(nuis["jpeg"])))
    return buf.getvalue()


class SyntheticFaces:
    """Deterministic generator of synthetic identities and their images.

    seed: the world; the same seed gives the same identities and images.
    num_identities: identities 0..num_identities-1 may be rendered (a bound, for checks).
    family_size: identities per look-alike family (identity // family_size is its family).
    spread: how far members stray from their family (smaller = harder negatives).
    nuisance: scale of the per-image nuisance (0 = canonical, clean images; 1 = default).
    """

    def __init__(self, seed: int = 0, num_identities: int = 1 << 30, family_size: int = 4,
                 spread: float = 1.0, nuisance: float = 1.0):
        if num_identities < 1:
            raise ToolchainError(f"num_identities must be >= 1, got {num_identities}")
        if family_size < 1:
            raise ToolchainError(f"family_size must be >= 1, got {family_size}")
        self.seed = int(seed)
        self.num_identities = int(num_identities)
        self.family_size = int(family_size)
        self.spread = float(spread)
        self.nuisance = float(nuisance)
        self._params = lru_cache(maxsize=65536)(self._make_params)

    def family_of(self, identity: int) -> int:
        return int(identity) // self.family_size

    def _make_params(self, identity: int) -> IdentityParams:
        return _identity_latents(self.seed, identity, self.family_size, self.spread)

    def identity_params(self, identity: int) -> IdentityParams:
        identity = int(identity)
        if not 0 <= identity < self.num_identities:
            raise ToolchainError(f"identity {identity} out of range [0, {self.num_identities})")
        return self._params(identity)

    def _image_rng(self, identity: int, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, _TAG_IMAGE, int(identity), int(index)])

    def render_jpeg_batch(self, identities, indices) -> list[bytes]:
        """JPEG bytes of images (identities[k], indices[k]); as stored by the writers."""
        identities = [int(i) for i in identities]
        indices = [int(i) for i in indices]
        if len(identities) != len(indices):
            raise ToolchainError("identities and indices differ in length")
        if not identities:
            return []
        params = [self.identity_params(i) for i in identities]
        rngs = [self._image_rng(i, j) for i, j in zip(identities, indices)]
        nuis = [_nuisance(r, self.nuisance) for r in rngs]
        imgs = _render_float(params, nuis)
        return [_finish(imgs[:, k].transpose(1, 2, 0), nuis[k], rngs[k]) for k in range(len(identities))]

    def render_batch(self, identities, indices) -> np.ndarray:
        """(B,112,112,3) uint8: the decoded JPEGs of render_jpeg_batch."""
        data = self.render_jpeg_batch(identities, indices)
        out = np.empty((len(data), SIZE, SIZE, 3), dtype=np.uint8)
        for k, d in enumerate(data):
            out[k] = decode_image(d)
        return out

    def render_jpeg(self, identity: int, index: int) -> bytes:
        return self.render_jpeg_batch([identity], [index])[0]

    def render(self, identity: int, index: int) -> np.ndarray:
        """One (112,112,3) uint8 image of `identity`, nuisance number `index`."""
        return self.render_batch([identity], [index])[0]


# --------------------------------------------------------------------------------------------
# The benchmark: a training split and held-out verification pairs


def _round_up(x: int, m: int) -> int:
    return -(-int(x) // m) * m


@dataclass(frozen=True)
class SyntheticBenchmark:
    """A synthetic data set: training identities plus verification pairs on held-out identities.

    Training identities are 0..train_identities-1. Verification identities start at the next
    family boundary (`val_offset`), so no verification identity *or family* is seen in training.
    Pairs come in 10 folds; each fold holds pairs/20 matched then pairs/20 mismatched pairs (the
    LFW layout), and `hard_negative_fraction` of the mismatched pairs are two members of the same
    look-alike family.
    """

    seed: int = 0
    train_identities: int = 400
    images_per_identity: int = 10
    val_identities: int = 100
    val_images_per_identity: int = 10
    pairs: int = 3000
    family_size: int = 4
    hard_negative_fraction: float = 0.5
    spread: float = 1.0
    nuisance: float = 1.0

    def __post_init__(self):
        checks = [
            (self.train_identities >= 1, "train_identities must be >= 1"),
            (self.images_per_identity >= 1, "images_per_identity must be >= 1"),
            (self.val_identities >= 2, "val_identities must be >= 2 (negative pairs need two)"),
            (self.val_images_per_identity >= 2, "val_images_per_identity must be >= 2 (matched pairs)"),
            (self.pairs >= 20 and self.pairs % 20 == 0, f"pairs must be a positive multiple of 20 "
                                                         f"(10 folds, half matched), got {self.pairs}"),
            (self.family_size >= 1, "family_size must be >= 1"),
            (0.0 <= self.hard_negative_fraction <= 1.0, "hard_negative_fraction must be in [0, 1]"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ToolchainError(msg)

    @property
    def val_offset(self) -> int:
        return _round_up(self.train_identities, self.family_size)

    @property
    def train_ids(self) -> np.ndarray:
        return np.arange(self.train_identities, dtype=np.int64)

    @property
    def val_ids(self) -> np.ndarray:
        return np.arange(self.val_offset, self.val_offset + self.val_identities, dtype=np.int64)

    def generator(self) -> SyntheticFaces:
        return SyntheticFaces(self.seed, self.val_offset + self.val_identities, self.family_size,
                              self.spread, self.nuisance)

    def to_dict(self) -> dict:
        return asdict(self)

    def pair_list(self) -> np.ndarray:
        """(pairs, 5) int64: identity_a, index_a, identity_b, index_b, issame; in fold order."""
        rng = np.random.default_rng([self.seed, _TAG_PAIRS, self.val_offset, self.val_identities,
                                     self.val_images_per_identity, self.pairs])
        ids = self.val_ids
        fam = ids // self.family_size
        k = self.val_images_per_identity
        per = self.pairs // 20
        rows = []
        for _fold in range(10):
            for _ in range(per):  # matched: two different images of one identity
                i = int(rng.choice(ids))
                a, b = rng.choice(k, size=2, replace=False)
                rows.append((i, a, i, b, 1))
            for _ in range(per):  # mismatched: a family member (hard) or anyone else
                i = int(rng.choice(ids))
                mates = ids[(fam == i // self.family_size) & (ids != i)]
                if len(mates) and rng.random() < self.hard_negative_fraction:
                    j = int(rng.choice(mates))
                else:
                    j = int(rng.choice(ids[ids != i]))
                rows.append((i, int(rng.integers(k)), j, int(rng.integers(k)), 0))
        return np.asarray(rows, dtype=np.int64)

    def verification_pairs(self, workers: int = 1, progress=None):
        """The held-out pairs rendered in memory, as `VerificationPairs`."""
        rows = self.pair_list()
        keys = sorted({(int(r[0]), int(r[1])) for r in rows} | {(int(r[2]), int(r[3])) for r in rows})
        where = {key: n for n, key in enumerate(keys)}
        images = render_many(self.generator(), [q[0] for q in keys], [q[1] for q in keys],
                             workers=workers, progress=progress)
        ia = np.array([where[(int(r[0]), int(r[1]))] for r in rows])
        ib = np.array([where[(int(r[2]), int(r[3]))] for r in rows])
        return VerificationPairs(images[ia], images[ib], rows[:, 4].astype(bool), name="synthetic",
                                 identities=(rows[:, 0], rows[:, 2]))


def default_benchmark(**overrides) -> SyntheticBenchmark:
    """The default synthetic data set (see SyntheticBenchmark for the split); override fields."""
    return SyntheticBenchmark(**overrides)


# --------------------------------------------------------------------------------------------
# Rendering many images, optionally in worker processes


def _render_chunk(args):
    spec, ids, idx, encoded = args
    gen = SyntheticFaces(**spec)
    if encoded:
        return gen.render_jpeg_batch(ids, idx)
    return gen.render_batch(ids, idx)


def _gen_spec(gen: SyntheticFaces) -> dict:
    return dict(seed=gen.seed, num_identities=gen.num_identities, family_size=gen.family_size,
                spread=gen.spread, nuisance=gen.nuisance)


def _chunks(identities, indices, encoded, gen, batch):
    spec = _gen_spec(gen)
    for s in range(0, len(identities), batch):
        yield spec, list(identities[s:s + batch]), list(indices[s:s + batch]), encoded


def iter_render(gen: SyntheticFaces, identities, indices, encoded: bool, workers: int = 1, batch: int = 32):
    """Yield rendered chunks in order (lists of JPEG bytes, or uint8 arrays).

    With workers > 1 the chunks are rendered by a fork-started process pool; the output does
    not depend on `workers` or `batch` because every image has its own random stream.
    """
    identities = np.asarray(identities, dtype=np.int64)
    indices = np.asarray(indices, dtype=np.int64)
    jobs = _chunks(identities, indices, encoded, gen, batch)
    if workers <= 1 or len(identities) <= batch:
        for job in jobs:
            yield _render_chunk(job)
        return
    import multiprocessing as mp

    ctx = mp.get_context("fork")  # numpy-only children: fork is cheap and safe here
    with ctx.Pool(workers) as pool:
        yield from pool.imap(_render_chunk, jobs)


def render_many(gen: SyntheticFaces, identities, indices, workers: int = 1, progress=None) -> np.ndarray:
    """(N,112,112,3) uint8 images for the given (identity, index) lists."""
    out = np.empty((len(identities), SIZE, SIZE, 3), dtype=np.uint8)
    pos = 0
    for chunk in iter_render(gen, identities, indices, encoded=False, workers=workers):
        out[pos:pos + len(chunk)] = chunk
        pos += len(chunk)
        if progress is not None:
            progress(len(chunk))
    return out

