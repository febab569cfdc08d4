"""Card secrets at rest (gateway/inventory/crypto.py) and their keys in settings: AES-256-GCM round trips, a wrong
key or wrong associated data never opens, nonces never repeat, the dedup ref ignores surrounding blanks, and
nothing secret shows in a repr or an error message."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest

from gateway.inventory.crypto import SecretKeyError, SecretRing, associated_data
from gateway.settings import Settings, SettingsError

K1, K2, DEDUP = os.urandom(32), os.urandom(32), os.urandom(32)
SECRET = "CARD-7Q2X-99ZZ-canary"


def _ring(active: str = "k1", **keys: bytes) -> SecretRing:
    return SecretRing(keys or {"k1": K1, "k2": K2}, active, DEDUP)


def _aad(sku_id: int = 5) -> bytes:
    return associated_data(1, sku_id)


def test_round_trip_under_the_active_key() -> None:
    ring = _ring("k2")
    sealed = ring.encrypt(SECRET, _aad())

    assert sealed.key_id == "k2" and len(sealed.nonce) == 12
    assert SECRET.encode() not in sealed.ciphertext and len(sealed.ciphertext) == len(SECRET) + 16
    assert ring.decrypt(sealed.key_id, sealed.nonce, sealed.ciphertext, _aad()) == SECRET


def test_a_wrong_key_wrong_aad_or_altered_bytes_never_open() -> None:
    sealed = _ring("k1").encrypt(SECRET, _aad())
    other = SecretRing({"k1": K2}, "k1", DEDUP)  # same id, another key
    altered = bytes([sealed.ciphertext[0] ^ 1]) + sealed.ciphertext[1:]

    cases = [(other, "k1", sealed.ciphertext, _aad()), (_ring(), "k1", sealed.ciphertext, _aad(6)),
             (_ring(), "k1", altered, _aad()), (_ring(), "k2", sealed.ciphertext, _aad())]  # fmt: skip
    for ring, kid, ct, aad in cases:
        with pytest.raises(SecretKeyError) as caught:
            ring.decrypt(kid, sealed.nonce, ct, aad)
        assert SECRET not in str(caught.value)
    with pytest.raises(SecretKeyError, match="not configured"):
        SecretRing({"k2": K2}, "k2", DEDUP).decrypt("k1", sealed.nonce, sealed.ciphertext, _aad())


def test_nonces_are_unique() -> None:
    ring = _ring()
    nonces = {ring.encrypt(SECRET, _aad()).nonce for _ in range(20_000)}
    assert len(nonces) == 20_000


def test_reencrypt_moves_a_secret_to_the_active_key() -> None:
    old = _ring("k1").encrypt(SECRET, _aad())
    new = _ring("k2").reencrypt(old.key_id, old.nonce, old.ciphertext, _aad())

    assert new.key_id == "k2" and new.nonce != old.nonce
    assert SecretRing({"k2": K2}, "k2", DEDUP).decrypt("k2", new.nonce, new.ciphertext, _aad()) == SECRET


def test_dedup_ref_is_keyed_and_ignores_surrounding_blanks() -> None:
    ring = _ring()
    assert ring.dedup_ref(f"  {SECRET}\t") == ring.dedup_ref(SECRET) != ring.dedup_ref(SECRET.lower())
    assert len(ring.dedup_ref(SECRET)) == 32
    assert SecretRing({"k1": K1}, "k1", os.urandom(32)).dedup_ref(SECRET) != ring.dedup_ref(SECRET)


def test_reprs_show_no_key_nor_ciphertext() -> None:
    ring, sealed = _ring(), _ring().encrypt(SECRET, _aad())
    for text in (repr(ring), repr(sealed)):
        assert K1.hex() not in text and base64.b64encode(K1).decode() not in text
        assert sealed.ciphertext.hex() not in text and str(sealed.ciphertext) not in text


def test_ring_refuses_bad_keys() -> None:
    with pytest.raises(ValueError, match="exactly 32"):
        SecretRing({"k1": os.urandom(16)}, "k1", DEDUP)
    with pytest.raises(ValueError, match="active"):
        SecretRing({"k1": K1}, "k9", DEDUP)
    with pytest.raises(ValueError, match="id"):
        SecretRing({"k|1": K1}, "k|1", DEDUP)
    with pytest.raises(ValueError, match="dedup"):
        SecretRing({"k1": K1}, "k1", b"short")


def _b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


def test_settings_read_the_keys_from_the_environment() -> None:
    settings = Settings.from_env({"RGW_SECRET_KEYS": f"k1:{_b64(K1)},k2:{_b64(K2)}", "RGW_SECRET_KEY_ID": "k2",
                                  "RGW_SECRET_DEDUP_KEY": _b64(DEDUP)})  # fmt: skip
    ring = settings.secret_ring()
    assert ring.active_id == "k2" and ring.key_ids == ("k1", "k2")
    assert ring.dedup_ref(SECRET) == _ring().dedup_ref(SECRET)


def test_settings_read_the_keys_from_mounted_files(tmp_path: Path) -> None:
    keys_file, dedup_file = tmp_path / "keys", tmp_path / "dedup"
    keys_file.write_text(f"k1:{_b64(K1)}\nk2:{_b64(K2)}\n")
    dedup_file.write_text(_b64(DEDUP) + "\n")
    ring = Settings.from_env({"RGW_SECRET_KEYS_FILE": str(keys_file),
                              "RGW_SECRET_DEDUP_KEY_FILE": str(dedup_file)}).secret_ring()  # fmt: skip
    assert ring.active_id == "k1" and ring.key_ids == ("k1", "k2")


def test_settings_refuse_bad_secret_keys_without_echoing_them() -> None:
    bad = {"RGW_SECRET_KEYS": f"k1:{_b64(K1[:20])}", "RGW_SECRET_DEDUP_KEY": "not base64!"}
    with pytest.raises(SettingsError) as caught:
        Settings.from_env(bad)
    assert "RGW_SECRET_KEYS" in str(caught.value) and "RGW_SECRET_DEDUP_KEY" in str(caught.value)
    assert _b64(K1[:20]) not in str(caught.value)
    with pytest.raises(SettingsError, match="RGW_SECRET_KEY_ID"):
        Settings.from_env({"RGW_SECRET_KEYS": f"k1:{_b64(K1)}", "RGW_SECRET_KEY_ID": "k2"})
    with pytest.raises(SettingsError, match="not both"):
        Settings.from_env({"RGW_SECRET_KEYS": f"k1:{_b64(K1)}", "RGW_SECRET_KEYS_FILE": "/dev/null"})
    with pytest.raises(SettingsError, match="RGW_SECRET_KEYS"):
        Settings.from_env({}).secret_ring()
