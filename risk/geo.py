"""Geometry of the location rules: great-circle distance, store radii and campaign regions.

Accuracy rule (benefit of the doubt, bounded): a reported location is a circle - its point and `accuracy_m`, the
radius of its 68% confidence circle. It counts as inside an area when that circle overlaps the area:

- store radius and circle regions: `great-circle distance - accuracy_m <= radius_m`;
- polygon regions: the point itself inside or on the boundary (the fast path); otherwise, when `accuracy_m > 0`,
  a 32-vertex geodesic polygon approximating the accuracy circle intersects the region.

Doubt is bounded because the engine treats a location less accurate than the policy's `max_accuracy_m` as no
location at all (LOCATION_TOO_INACCURATE), so a vague location never wins the benefit of a wide circle.

Polygons use GeoJSON axis order, positions `[lon, lat]` (RFC 7946), and straight edges in (lon, lat) degrees, like
GeoJSON. A ring whose consecutive vertices jump by more than 180 degrees of longitude crosses the antimeridian: its
negative longitudes get +360 (Fiji `177 .. -178` becomes `177 .. 182`), and the region is unioned with copies shifted
by -360 and +360, so points reported at either -179.5 or 179.5 are tested correctly.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import shapely
from shapely import affinity
from shapely.geometry import Polygon

from risk.model import Place

EARTH_RADIUS_M = 6_371_008.8  # mean Earth radius (IUGG), metres
_POLE_DISTANCE_M = math.pi / 2 * EARTH_RADIUS_M
_BEARINGS = tuple(2 * math.pi * i / 32 for i in range(32))

Position = Sequence[float]  # [lon, lat]


def haversine_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance in metres between two WGS 84 positions, on the mean-radius sphere."""
    phi1, phi2 = math.radians(lat1), math.radians(lat2)
    half_dphi = (phi2 - phi1) / 2
    half_dlambda = math.radians(lon2 - lon1) / 2
    h = math.sin(half_dphi) ** 2 + math.cos(phi1) * math.cos(phi2) * math.sin(half_dlambda) ** 2
    # Rounding can push h a hair above 1 for antipodal points; asin would then raise.
    return 2 * EARTH_RADIUS_M * math.asin(math.sqrt(min(1.0, h)))


def within_radius(store_lat: float, store_lon: float, radius_m: float, place: Place) -> bool:
    """Whether a location's accuracy circle overlaps a store's radius (the module's accuracy rule)."""
    distance = haversine_m(store_lat, store_lon, place.latitude, place.longitude)
    return distance - place.accuracy_m <= radius_m


def crosses_antimeridian(rings: Iterable[Sequence[Position]]) -> bool:
    """Whether any ring has consecutive vertices more than 180 degrees of longitude apart."""
    return any(abs(b[0] - a[0]) > 180 for ring in rings for a, b in itertools.pairwise(ring))


def unwrap(rings: Sequence[Sequence[Position]]) -> list[list[tuple[float, float]]]:
    """The rings of one polygon as (lon, lat) tuples, negative longitudes +360 if the polygon crosses the
    antimeridian (all rings together, so a hole stays on the same side as its shell)."""
    shift = crosses_antimeridian(rings)
    return [[(lon + 360 if shift and lon < 0 else lon, lat) for lon, lat in ring] for ring in rings]


def polygon_problem(exterior: Sequence[Position], holes: Sequence[Sequence[Position]]) -> str | None:
    """Why a polygon (closed rings of in-range positions) cannot be used, or None when it can."""
    rings = unwrap([exterior, *holes])
    if crosses_antimeridian(rings):
        # Still a jump after unwrapping: the ring crosses the antimeridian and the prime meridian as well.
        return "ring spans 180 degrees of longitude or more; split it in two"
    reason = str(shapely.is_valid_reason(Polygon(rings[0], rings[1:])))
    return None if reason == "Valid Geometry" else f"invalid polygon: {reason}"[:96]


def _destination(lat: float, lon: float, bearing: float, distance_m: float) -> tuple[float, float]:
    """The (lon, lat) reached from a point along a great circle; lon unwrapped to within 180 of the start."""
    phi, delta = math.radians(lat), distance_m / EARTH_RADIUS_M
    sin_phi2 = math.sin(phi) * math.cos(delta) + math.cos(phi) * math.sin(delta) * math.cos(bearing)
    phi2 = math.asin(max(-1.0, min(1.0, sin_phi2)))
    y = math.sin(bearing) * math.sin(delta) * math.cos(phi)
    x = math.cos(delta) - math.sin(phi) * sin_phi2
    dlon = (math.degrees(math.atan2(y, x)) + 180) % 360 - 180
    return lon + dlon, math.degrees(phi2)


def accuracy_polygon(place: Place) -> Any:
    """A location's accuracy circle as a shapely polygon in (lon, lat), longitudes around the point's own.

    A circle enclosing a pole has no such ring; it becomes the band from its lowest vertex to the pole, over every
    longitude - a little larger than the circle, which only widens a doubt already bounded by max_accuracy_m."""
    lat, lon, radius = place.latitude, place.longitude, place.accuracy_m
    ring = [_destination(lat, lon, bearing, radius) for bearing in _BEARINGS]
    if radius < (90 - abs(lat)) / 90 * _POLE_DISTANCE_M:  # the circle does not reach the nearer pole
        return Polygon(ring)
    if lat >= 0:
        return shapely.box(lon - 180, min(p[1] for p in ring), lon + 180, 90)
    return shapely.box(lon - 180, -90, lon + 180, max(p[1] for p in ring))


@dataclass(frozen=True, slots=True)
class Circle:
    """A circular region: centre in degrees, radius in metres along the sphere."""

    latitude: float
    longitude: float
    radius_m: float


class Regions:
    """A campaign's regions - circles and polygons - prepared once and tested per request.

    Circles are great-circle distances, not shapely buffers in degrees: a degree of longitude shrinks with the
    cosine of the latitude, so a buffer in degrees would be an ellipse, wrong near the poles and cut at the
    antimeridian, while the distance on the sphere is exact everywhere."""

    __slots__ = ("_area", "_circles")

    def __init__(self, circles: Sequence[Circle], area: Any | None) -> None:
        self._circles = tuple(circles)
        self._area = area

    @classmethod
    def from_specs(cls, specs: Iterable[Mapping[str, Any]]) -> Regions:
        """Regions from a validated policy's `regions` entries (`{"circle": ...}` or `{"polygon": ...}`)."""
        circles, polygons = [], []
        for spec in specs:
            if (circle := spec.get("circle")) is not None:
                circles.append(Circle(circle["lat"], circle["lon"], circle["radius_m"]))
            else:
                rings = unwrap([spec["polygon"]["exterior"], *spec["polygon"].get("holes", ())])
                polygons.append(Polygon(rings[0], rings[1:]))
        return cls(circles, _prepared_area(polygons))

    def __eq__(self, other: object) -> bool:
        # By content, so policies resolved from equal documents in different books compare equal.
        if not isinstance(other, Regions):
            return NotImplemented
        if self._area is None or other._area is None:
            return self._circles == other._circles and self._area is other._area
        return self._circles == other._circles and bool(shapely.equals_exact(self._area, other._area, 0.0))

    __hash__ = None  # type: ignore[assignment]  # mutable-looking content: like the Policy holding it, unhashable

    @property
    def empty(self) -> bool:
        """True when there is no region at all (nothing can be inside)."""
        return not self._circles and self._area is None

    def contains(self, place: Place) -> bool:
        """Whether the location's accuracy circle overlaps any region (the module's accuracy rule)."""
        for c in self._circles:
            if within_radius(c.latitude, c.longitude, c.radius_m, place):
                return True
        return self._area is not None and self._area_overlaps(place)

    def _area_overlaps(self, place: Place) -> bool:
        if shapely.intersects_xy(self._area, place.longitude, place.latitude):
            return True
        return place.accuracy_m > 0 and bool(shapely.intersects(self._area, accuracy_polygon(place)))


def _prepared_area(polygons: Sequence[Any]) -> Any | None:
    """One prepared geometry of all polygons and their copies a turn east and west (antimeridian, see above)."""
    if not polygons:
        return None
    area = shapely.union_all(polygons)
    area = shapely.union_all([area, affinity.translate(area, xoff=-360), affinity.translate(area, xoff=360)])
    shapely.prepare(area)
    return area
