"""Image IDs are content addresses that workers, caches and catalogs hold across versions: a
change to how caps are represented in code must never change a manifest's bytes or its ID."""

from __future__ import annotations

import contextlib

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from catalog.caps import Caps, NetworkMode
from catalog.errors import ImageManifestError
from catalog.manifest import ImageManifest, LayerRef

# IDs computed by the code before caps had one type (the manifest's own DefaultCaps then).
GOLDEN = {
    "full": "264fe3b1b4b0422d53621a7e4bc3127d1fe0f91fbc100e8fdfdfec4b8561a3df",
    "defaults": "baa5ab68b713dbaa4821eb91214df2afa61c21325ff7387f5462224218489020",
}


def _manifests() -> dict[str, ImageManifest]:
    full = ImageManifest(
        os="tiny",
        os_version="1",
        kernel="a" * 64,
        initramfs="b" * 64,
        cmdline="console=ttyS0",
        layers=(
            LayerRef(blob="c" * 64, what="task"),
            LayerRef(blob="d" * 64, what="os", format="erofs"),
        ),
        caps=Caps(
            vcpus=2,
            cpu_share=1.5,
            memory_mib=300,
            disk_mib=512,
            disk_bps=1048576,
            network=NetworkMode.PROXY,
            net_allow=("deb.debian.org:443", "*.pypi.org"),
        ),
        command=("sh", "-c", "echo hi"),
        env=(("A", "1"), ("B", "2")),
        cwd="/work",
        timeout_s=60,
    )
    defaults = ImageManifest(
        os="debian-12",
        os_version="2",
        kernel="1" * 64,
        initramfs="2" * 64,
        cmdline="",
        layers=(),
        caps=Caps(),
        command=("true",),
        env=(),
        cwd="/",
        timeout_s=3600,
    )
    return {"full": full, "defaults": defaults}


def test_image_ids_are_byte_identical_to_the_pinned_ones() -> None:
    for name, manifest in _manifests().items():
        assert manifest.id == GOLDEN[name], name


def test_a_manifest_round_trips_with_its_caps() -> None:
    for manifest in _manifests().values():
        data = manifest.encode()
        assert ImageManifest.decode(data, expected_id=manifest.id) == manifest


@given(
    st.recursive(
        st.none()
        | st.booleans()
        | st.integers(-(2**63), 2**64 - 1)
        | st.text(max_size=8)
        | st.binary(max_size=8),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner),
        max_leaves=20,
    )
)
def test_any_bytes_decode_to_a_manifest_or_the_manifest_error(value: object) -> None:
    # A scheduler names the image; whatever its manifest blob holds, the worker gets a typed
    # refusal, never another exception that would end the lease's task or the process.
    data = msgpack.packb(value, use_bin_type=True)
    with contextlib.suppress(ImageManifestError):
        ImageManifest.decode(data)


def test_manifests_of_the_wrong_shape_are_refused() -> None:
    good = _manifests()["full"].to_dict()
    for bad in (
        [1, 2],
        "x",
        {**good, "caps": []},
        {**good, "layers": {"a": 1}},
        {**good, "v": 1, "env": 3},
    ):
        with pytest.raises(ImageManifestError):
            ImageManifest.decode(msgpack.packb(bad, use_bin_type=True))
