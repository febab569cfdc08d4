from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from risk import geo
from risk.model import Place

LATS = st.floats(-90, 90, allow_nan=False)
LONS = st.floats(-180, 180, allow_nan=False)
METRES_PER_DEGREE = geo.EARTH_RADIUS_M * math.pi / 180
DAM_SQUARE = (52.3731, 4.8926)  # Amsterdam
PARIS = Place(48.8566, 2.3522)
# Berlin's box with a hole in the middle: lon 13..14, lat 52..53; hole lon 13.4..13.6, lat 52.4..52.6.
BERLIN = [[13.0, 52.0], [14.0, 52.0], [14.0, 53.0], [13.0, 53.0], [13.0, 52.0]]
BERLIN_HOLE = [[13.4, 52.4], [13.6, 52.4], [13.6, 52.6], [13.4, 52.6], [13.4, 52.4]]
FIJI = [[177.0, -15.0], [-178.0, -15.0], [-178.0, -20.0], [177.0, -20.0], [177.0, -15.0]]


def polygon(exterior: list[list[float]], *holes: list[list[float]]) -> geo.Regions:
    return geo.Regions.from_specs([{"polygon": {"exterior": exterior, "holes": list(holes)}}])


def circle(lat: float, lon: float, radius_m: float) -> geo.Regions:
    return geo.Regions.from_specs([{"circle": {"lat": lat, "lon": lon, "radius_m": radius_m}}])


def test_haversine_known_distances() -> None:
    assert geo.haversine_m(0, 0, 1, 0) == pytest.approx(METRES_PER_DEGREE)
    assert geo.haversine_m(0, 0, 0, 180) == pytest.approx(math.pi * geo.EARTH_RADIUS_M)
    assert geo.haversine_m(0, 179.5, 0, -179.5) == pytest.approx(METRES_PER_DEGREE)  # across the antimeridian
    # Paris - London is about 344 km.
    assert geo.haversine_m(48.8566, 2.3522, 51.5074, -0.1278) == pytest.approx(343_500, rel=0.005)


@given(LATS, LONS, LATS, LONS)
def test_haversine_is_symmetric_and_bounded(lat1: float, lon1: float, lat2: float, lon2: float) -> None:
    d = geo.haversine_m(lat1, lon1, lat2, lon2)
    assert d == pytest.approx(geo.haversine_m(lat2, lon2, lat1, lon1), abs=1e-6)
    assert 0 <= d <= math.pi * geo.EARTH_RADIUS_M + 1e-6
    assert geo.haversine_m(lat1, lon1, lat1, lon1) == 0


@given(LATS, LONS, LATS, LONS, LATS, LONS)
def test_haversine_triangle_inequality(a: float, b: float, c: float, d: float, e: float, f: float) -> None:
    assert geo.haversine_m(a, b, e, f) <= geo.haversine_m(a, b, c, d) + geo.haversine_m(c, d, e, f) + 1e-3


def test_store_radius_admits_250_m_and_declines_300_km() -> None:
    lat, lon = DAM_SQUARE
    near = Place(lat + 250 / METRES_PER_DEGREE, lon)
    far = Place(lat + 300_000 / METRES_PER_DEGREE, lon)
    assert geo.within_radius(lat, lon, 300, near)
    assert not geo.within_radius(lat, lon, 300, far)


def test_store_radius_gives_the_accuracy_circle_the_benefit_of_the_doubt() -> None:
    lat, lon = DAM_SQUARE
    point = (lat + 400 / METRES_PER_DEGREE, lon)  # 400 m away from a 300 m radius
    assert not geo.within_radius(lat, lon, 300, Place(*point, accuracy_m=90))
    assert geo.within_radius(lat, lon, 300, Place(*point, accuracy_m=110))


@given(LATS, LONS, LATS, LONS, st.floats(0, 50_000))
def test_circle_contains_exactly_what_its_accuracy_rule_says(
    lat: float, lon: float, plat: float, plon: float, accuracy: float
) -> None:
    d = geo.haversine_m(lat, lon, plat, plon)
    place = Place(plat, plon, accuracy)
    assert circle(lat, lon, d + 1).contains(place)
    if d - accuracy > 2:
        assert not circle(lat, lon, d - accuracy - 1).contains(place)


def test_circle_near_the_north_pole_contains_a_point_on_the_opposite_meridian() -> None:
    # 0.2 degrees of latitude (about 22 km) apart over the pole, though 180 degrees of longitude apart.
    assert circle(89.9, 0.0, 30_000).contains(Place(89.9, 180.0))
    assert not circle(89.9, 0.0, 15_000).contains(Place(89.9, 180.0))


def test_polygon_with_a_hole() -> None:
    berlin = polygon(BERLIN, BERLIN_HOLE)
    assert berlin.contains(Place(52.2, 13.2))
    assert not berlin.contains(Place(52.5, 13.5))  # in the hole
    # The hole's nearest edge is 0.1 degree of longitude away: about 6.8 km at 52.5 N.
    assert not berlin.contains(Place(52.5, 13.5, accuracy_m=5_000))
    assert berlin.contains(Place(52.5, 13.5, accuracy_m=8_000))  # the accuracy circle reaches the ring
    assert not berlin.contains(Place(52.5, 15.0))


def test_accuracy_circle_straddling_the_boundary() -> None:
    berlin = polygon(BERLIN)
    outside = Place(52.5, 14.0 + 500 / (METRES_PER_DEGREE * math.cos(math.radians(52.5))))  # 500 m east
    assert not berlin.contains(outside)
    assert not berlin.contains(Place(outside.latitude, outside.longitude, accuracy_m=400))
    assert berlin.contains(Place(outside.latitude, outside.longitude, accuracy_m=600))


def test_a_point_on_the_boundary_is_inside() -> None:
    assert polygon(BERLIN).contains(Place(52.5, 14.0))


def test_axis_order_is_lon_lat() -> None:
    box = [[2.2, 48.8], [2.5, 48.8], [2.5, 48.95], [2.2, 48.95], [2.2, 48.8]]
    assert polygon(box).contains(PARIS)
    swapped = [[lat, lon] for lon, lat in box]  # the same numbers read as (lat, lon)
    assert not polygon(swapped).contains(PARIS)


@pytest.mark.parametrize("lon", [177.5, 179.5, 180.0, -180.0, -179.5, -178.5])
def test_antimeridian_polygon_contains_both_sides(lon: float) -> None:
    assert polygon(FIJI).contains(Place(-17.0, lon))


@pytest.mark.parametrize("lon", [176.5, -177.5, 0.0, 2.0, -2.0])
def test_antimeridian_polygon_excludes_the_rest(lon: float) -> None:
    assert not polygon(FIJI).contains(Place(-17.0, lon))


def test_accuracy_circle_reaching_across_the_antimeridian() -> None:
    east_of_it = polygon([[-179.9, -1.0], [-179.0, -1.0], [-179.0, 1.0], [-179.9, 1.0]])
    place = (0.0, 179.95)  # 0.15 degrees (about 16.7 km) west of the polygon, on the other side of 180
    assert not east_of_it.contains(Place(*place, accuracy_m=10_000))
    assert east_of_it.contains(Place(*place, accuracy_m=20_000))


def test_accuracy_circle_enclosing_the_pole() -> None:
    near_pole = polygon([[100.0, 89.5], [110.0, 89.5], [110.0, 89.9], [100.0, 89.9]])
    assert near_pole.contains(Place(89.95, -80.0, accuracy_m=20_000))  # over the pole
    assert not near_pole.contains(Place(89.0, -80.0, accuracy_m=20_000))


def test_unwrap_shifts_negative_longitudes_of_a_crossing_polygon_only() -> None:
    assert geo.unwrap([FIJI])[0][1] == (182.0, -15.0)
    assert geo.unwrap([BERLIN])[0] == [(lon, lat) for lon, lat in BERLIN]
    assert geo.unwrap([[[-1.0, 0.0], [1.0, 0.0], [1.0, 1.0], [-1.0, 0.0]]])[0][0] == (-1.0, 0.0)


def test_polygon_problems() -> None:
    assert geo.polygon_problem(FIJI, []) is None
    assert geo.polygon_problem(BERLIN, [BERLIN_HOLE]) is None
    around = [[10.0, 0.0], [100.0, 0.0], [179.0, 0.0], [-179.0, 1.0], [-100.0, 1.0], [-10.0, 1.0], [10.0, 0.0]]
    assert "180 degrees" in (geo.polygon_problem(around, []) or "")
    bow_tie = [[0.0, 0.0], [1.0, 1.0], [1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]
    assert (geo.polygon_problem(bow_tie, []) or "").startswith("invalid polygon: Self-intersection")
    hole_outside = [[20.0, 20.0], [21.0, 20.0], [21.0, 21.0], [20.0, 20.0]]
    assert "Hole" in (geo.polygon_problem(BERLIN, [hole_outside]) or "")


def test_empty_regions_contain_nothing() -> None:
    regions = geo.Regions.from_specs([])
    assert regions.empty
    assert not regions.contains(PARIS)


def test_regions_compare_by_content() -> None:
    assert polygon(BERLIN, BERLIN_HOLE) == polygon(BERLIN, BERLIN_HOLE)
    assert polygon(BERLIN) != polygon(BERLIN, BERLIN_HOLE)
    assert circle(1.0, 2.0, 3.0) == circle(1.0, 2.0, 3.0)
    assert circle(1.0, 2.0, 3.0) != circle(1.0, 2.0, 4.0)
    assert circle(1.0, 2.0, 3.0) != polygon(BERLIN)
