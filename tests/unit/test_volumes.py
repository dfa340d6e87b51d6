"""Volume names, the volume registry and the datastore manifest of the master target."""

import json
import os

import pytest

from replication.disks import create_disk, open_disk
from replication.errors import (
    ConfigError,
    InvalidVolumeNameError,
    UnknownVolumeError,
    VolumeExistsError,
)
from replication.volumes import (
    MANIFEST_NAME,
    VolumeRegistry,
    validate_volume_name,
    volume_disk_id,
)

MiB = 1 << 20


@pytest.mark.parametrize(
    "name",
    ["../x", "a/b", "/abs", "a\\b", "", ".", "..", "x" * 65, "a\0b", "a b", "é", "a\nb", None, 7],
)
def test_invalid_names_are_refused(name):
    with pytest.raises(InvalidVolumeNameError):
        validate_volume_name(name)


@pytest.mark.parametrize("name", ["a", "x" * 64, "vol-1.data_2", "..x", "x..", "-", "_"])
def test_valid_names(name):
    assert validate_volume_name(name) == name


def test_disk_id_is_deterministic_and_per_volume():
    assert volume_disk_id("vol1") == volume_disk_id("vol1")
    assert len(volume_disk_id("vol1")) == 16
    assert volume_disk_id("vol1") != volume_disk_id("vol2")
    with pytest.raises(InvalidVolumeNameError):
        volume_disk_id("../vol1")


def test_registered_volume_info(tmp_path):
    path = tmp_path / "disk.raw"
    create_disk(str(path), 4 * MiB).close()
    reg = VolumeRegistry({"data": path}, None)
    info = reg.get("data")
    assert (info.name, info.path, info.size, info.format) == ("data", str(path), 4 * MiB, "raw")
    assert not info.created
    assert [v.name for v in reg.list()] == ["data"]


def test_unknown_and_invalid_names(tmp_path):
    reg = VolumeRegistry({}, tmp_path)
    with pytest.raises(UnknownVolumeError):
        reg.get("nope")
    with pytest.raises(InvalidVolumeNameError):
        reg.get("../nope")
    with pytest.raises(InvalidVolumeNameError):
        VolumeRegistry({"a/b": tmp_path / "x"}, None)


def test_create_makes_a_vmdk_in_the_datastore(tmp_path):
    reg = VolumeRegistry({}, tmp_path)
    info = reg.create("vol1", 8 * MiB)
    assert os.path.dirname(os.path.dirname(info.path)) == os.path.realpath(tmp_path)
    assert (info.size, info.format, info.subformat) == (8 * MiB, "vmdk", "monolithicSparse")
    assert info.created
    with open_disk(info.path) as disk:
        assert disk.virtual_size == 8 * MiB
        assert disk.read(0, 4096) == bytes(4096)


def test_create_is_idempotent_for_the_same_size(tmp_path):
    reg = VolumeRegistry({}, tmp_path)
    first = reg.create("vol1", 8 * MiB)
    with open_disk(first.path, writable=True) as disk:
        disk.write(0, b"keep me")
        disk.flush()
    again = reg.create("vol1", 8 * MiB)
    assert again == first
    with open_disk(first.path) as disk:
        assert disk.read(0, 7) == b"keep me"  # not recreated


def test_create_refuses_another_size_or_subformat(tmp_path):
    reg = VolumeRegistry({}, tmp_path)
    reg.create("vol1", 8 * MiB)
    with pytest.raises(VolumeExistsError):
        reg.create("vol1", 16 * MiB)
    with pytest.raises(VolumeExistsError):
        reg.create("vol1", 8 * MiB, subformat="monolithicFlat")
    assert reg.get("vol1").size == 8 * MiB


def test_create_refuses_a_registered_name_of_another_size(tmp_path):
    path = tmp_path / "disk.raw"
    create_disk(str(path), 4 * MiB).close()
    reg = VolumeRegistry({"data": path}, tmp_path / "store")
    assert reg.create("data", 4 * MiB).path == str(path)
    with pytest.raises(VolumeExistsError):
        reg.create("data", 8 * MiB)


def test_create_without_datastore_is_a_config_error(tmp_path):
    reg = VolumeRegistry({}, None)
    with pytest.raises(ConfigError):
        reg.create("vol1", MiB)


def test_manifest_survives_a_new_registry(tmp_path):
    VolumeRegistry({}, tmp_path).create("vol1", 8 * MiB)
    VolumeRegistry({}, tmp_path).create("vol2", 4 * MiB, subformat="monolithicFlat")
    reg = VolumeRegistry({}, tmp_path)
    assert [(v.name, v.size, v.subformat) for v in reg.list()] == [
        ("vol1", 8 * MiB, "monolithicSparse"),
        ("vol2", 4 * MiB, "monolithicFlat"),
    ]
    doc = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert doc["volumes"]["vol1"] == {"size": 8 * MiB, "subformat": "monolithicSparse"}
    assert not [p for p in os.listdir(tmp_path) if ".tmp." in p]  # no temp file left


def test_unlisted_disk_left_by_a_crash_is_adopted_only_if_it_matches(tmp_path):
    reg = VolumeRegistry({}, tmp_path)
    # What a crash after create_disk but before the manifest write leaves behind:
    (tmp_path / "vol1").mkdir()
    create_disk(str(tmp_path / "vol1" / "vol1.vmdk"), 8 * MiB, format="vmdk").close()
    (tmp_path / "vol2").mkdir()
    create_disk(str(tmp_path / "vol2" / "vol2.vmdk"), 8 * MiB, format="vmdk").close()
    assert reg.names() == []
    assert reg.create("vol1", 8 * MiB).size == 8 * MiB
    with pytest.raises(VolumeExistsError):
        reg.create("vol2", 4 * MiB)
    assert VolumeRegistry({}, tmp_path).names() == ["vol1"]


def test_symlink_out_of_the_datastore_is_refused(tmp_path):
    store, outside = tmp_path / "store", tmp_path / "outside"
    store.mkdir()
    outside.mkdir()
    (store / "evil").symlink_to(outside)
    reg = VolumeRegistry({}, store)
    with pytest.raises(InvalidVolumeNameError, match="resolves"):
        reg.create("evil", MiB)
    assert list(outside.iterdir()) == []
    assert reg.names() == []


def test_hostile_manifest_is_refused(tmp_path):
    (tmp_path / MANIFEST_NAME).write_text(
        json.dumps({"version": 1, "volumes": {"../etc": {"size": 1, "subformat": "x"}}})
    )
    with pytest.raises(ConfigError):
        VolumeRegistry({}, tmp_path)
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ConfigError):
        VolumeRegistry({}, tmp_path)


def test_list_reports_a_broken_volume_without_hiding_others(tmp_path):
    good = tmp_path / "good.raw"
    create_disk(str(good), MiB).close()
    reg = VolumeRegistry({"good": good, "gone": tmp_path / "missing.raw"}, None)
    by_name = {v.name: v for v in reg.list()}
    assert by_name["good"].problem is None
    assert by_name["gone"].problem is not None
    assert by_name["gone"].problem.startswith("disk.")
