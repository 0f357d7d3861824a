"""Export of the three bundles in the model-zoo layout: files, rewritten configs, vendored code, metadata.

The exported bundles are run in a clean virtual environment in ``test_export_clean_venv.py``.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from export_helpers import REPO, random_due_weights

from due_ext.cli import main
from due_ext.export import export_bundle, verify_bundle_metadata
from due_ext.export.metadata import DRAFT_SCHEMA, STORED_SCHEMA, reconstruct_release_schema
from due_ext.export.vendor import _rewrite_source
from due_ext.extras import MissingExtraError, install_command, missing_modules

BUNDLES = ("due", "interpolator", "uncertainty")
UNVENDORED = re.compile(r"(?<![\w.])due_ext\b")


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("exported")
    weights = {"due": random_due_weights(root / "due_weights.pt")}
    for name in BUNDLES:
        summary = export_bundle(name, root / name, zip=True, model=weights.get(name))
        assert summary["zip"] == str(root / f"{name}.zip")
        assert summary["large_files"] == []  # every shipped file is under the model zoo's 25 MB
    return {name: root / name for name in BUNDLES}


@pytest.mark.parametrize("name", BUNDLES)
def test_model_zoo_layout(exported, name):
    folder = exported[name]
    for rel in (
        "configs/train.json",
        "configs/inference.json",
        "configs/metadata.json",
        "configs/logging.conf",
        "models/model.pt",
        "docs/README.md",
        "docs/data_license.txt",
        "LICENSE",
        "scripts/__init__.py",
        "scripts/due_ext/__init__.py",
        "scripts/due_ext/ops/_dispatch.py",
    ):
        assert (folder / rel).is_file(), rel
    assert not (folder / "large_files.yml").exists()
    # the compiled extension is never shipped, nor the CLI or the exporter
    assert not list(folder.rglob("_C*.so"))
    assert not (folder / "scripts/due_ext/cli.py").exists() and not (folder / "scripts/due_ext/export").exists()
    shipped = folder.parent / "due_weights.pt" if name == "due" else REPO / "bundles" / name / "models/model.pt"
    assert (folder / "models/model.pt").read_bytes() == shipped.read_bytes()
    readme = (folder / "docs/README.md").read_text()
    assert "## Exported bundle" in readme and "configs/inference.json" in readme
    with zipfile.ZipFile(f"{folder}.zip") as zf:
        names = set(zf.namelist())
    # the archive holds the bundle folder itself, file for file
    files = {f"{name}/{p.relative_to(folder).as_posix()}" for p in folder.rglob("*") if p.is_file()}
    assert names == {f for f in files if "__pycache__" not in f}
    assert {f"{name}/configs/metadata.json", f"{name}/models/model.pt", f"{name}/scripts/due_ext/__init__.py"} <= names


@pytest.mark.parametrize("name", BUNDLES)
def test_configs_reference_only_the_vendored_code(exported, name):
    for path in (exported[name] / "configs").glob("*.json"):
        if path.name == "metadata.json":  # prose (data_source names the due_ext CLI), not code
            continue
        text = path.read_text()
        config = json.loads(text)
        assert not UNVENDORED.findall(text.replace("scripts.due_ext", "")), f"{path.name} still imports due_ext"
        if "bundle_root" in config:
            assert config["bundle_root"] == "."
        if any("scripts.due_ext" in i for i in config.get("imports", [])):
            assert "$import scripts" in config["imports"]
    for path in (exported[name] / "scripts").rglob("*.py"):
        source = path.read_text()
        assert not re.search(r"^\s*(from|import)\s+due_ext\b", source, flags=re.M), path
        assert "torch.ops.due_ext." not in source and '"due_ext::' not in source, path


def test_exported_train_configs_point_inside_the_bundle(exported):
    due = json.loads((exported["due"] / "configs/train.json").read_text())
    assert due["training_datalist"].endswith("derive=False)")  # no sibling bundles to derive with
    unc = json.loads((exported["uncertainty"] / "configs/train.json").read_text())
    assert unc["interpolator_weights"] == "$@bundle_root + '/models/interpolator.pt'"
    interpolator = REPO / "bundles" / "interpolator" / "models" / "model.pt"
    assert (exported["uncertainty"] / "models/interpolator.pt").read_bytes() == interpolator.read_bytes()


@pytest.mark.parametrize("name", BUNDLES)
def test_metadata_versions_and_schema(exported, name):
    meta_file = exported[name] / "configs/metadata.json"
    meta = json.loads(meta_file.read_text())
    assert meta["version"] in meta["changelog"]
    assert meta["monai_version"] == metadata.version("monai")
    assert meta["pytorch_version"] == metadata.version("torch").split("+")[0]
    assert meta["numpy_version"] == metadata.version("numpy")
    required = meta["required_packages_version"]
    assert "due-ext" not in required  # replaced by the vendored code
    assert required["pytorch-ignite"] == metadata.version("pytorch-ignite")
    assert required["nibabel"] == metadata.version("nibabel")
    assert set(meta["network_data_format"]["inputs"]) >= {"image"}
    assert set(meta["network_data_format"]["outputs"]) >= {"pred"}
    verify_bundle_metadata(meta_file)  # raises on failure


def test_interpolator_metadata_carries_the_einops_requirement(exported):
    meta = json.loads((exported["interpolator"] / "configs/metadata.json").read_text())
    assert meta["required_packages_version"]["einops"] == metadata.version("einops")


def test_stored_schemas_are_the_documented_files():
    assert hashlib.md5(DRAFT_SCHEMA.read_bytes()).hexdigest() == "b11acc946148c0186924f8234562b947"
    stored = json.loads(STORED_SCHEMA.read_text())
    assert stored == reconstruct_release_schema(json.loads(DRAFT_SCHEMA.read_text()))
    draft = json.loads(DRAFT_SCHEMA.read_text())
    assert set(draft["required"]) - set(stored["required"]) == {
        "authorship",
        "dataset_dir",
        "optional_packages_version",
    }
    assert set(stored["required"]) - set(draft["required"]) == {"authors"}


@pytest.mark.parametrize(
    "edit, rule",
    [
        (lambda m: m["network_data_format"]["outputs"].pop("pred"), "required"),
        (lambda m: m.update(version=1), "type"),
        (lambda m: m["network_data_format"]["inputs"]["image"].update(num_channels="one"), "type"),
        (lambda m: m.pop("copyright"), "required"),
        (lambda m: m.pop("authors"), "required"),
        (lambda m: m["network_data_format"]["inputs"]["image"].update(value_range=["0", "1"]), "type"),
    ],
)
def test_broken_metadata_fails_validation(exported, tmp_path, edit, rule):
    meta = json.loads((exported["due"] / "configs/metadata.json").read_text())
    edit(meta)
    broken = tmp_path / "metadata.json"
    broken.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=rule):
        verify_bundle_metadata(broken)


def test_large_files_are_listed_with_their_hash(tmp_path):
    summary = export_bundle("uncertainty", tmp_path / "unc", large_file_mb=1.0)
    assert summary["large_files"] == ["models/interpolator.pt"]  # 2.6 MB; model.pt is 0.5 MB
    listing = (tmp_path / "unc/large_files.yml").read_text()
    md5 = hashlib.md5((tmp_path / "unc/models/interpolator.pt").read_bytes()).hexdigest()
    assert 'path: "models/interpolator.pt"' in listing and f'hash_val: "{md5}"' in listing


def test_cli_export_replaces_the_folder(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("from an older export")
    main(["bundle", "export", "uncertainty", "--out", str(out)])
    assert "uncertainty: exported to" in capsys.readouterr().out
    assert not (out / "stale.txt").exists() and (out / "configs/metadata.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left behind


def test_unknown_bundle_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown"):
        export_bundle("segmenter", tmp_path / "x")


def test_missing_weights_fail_before_anything_is_written(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="no weights to export"):
        export_bundle("due", tmp_path / "x", model=tmp_path / "absent.pt")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(SystemExit) as exit_info:
        main(["bundle", "export", "due", "--out", str(tmp_path / "x"), "--model", str(tmp_path / "absent.pt")])
    assert exit_info.value.code == 1 and "no weights to export" in capsys.readouterr().err


def test_metadata_survives_monai_parsing_with_its_requirements(exported):
    # MONAI renames optional_packages_version onto required_packages_version when it parses metadata
    from monai.bundle import ConfigParser

    meta_file = exported["due"] / "configs/metadata.json"
    assert "optional_packages_version" not in json.loads(meta_file.read_text())
    parser = ConfigParser()
    parser.read_meta(str(meta_file))
    required = parser["_meta_"]["required_packages_version"]
    assert required["pytorch-ignite"] == metadata.version("pytorch-ignite")
    assert required["tensorboard"] == metadata.version("tensorboard")  # the train configs' TensorBoard handlers


def test_rewrite_makes_imports_relative_and_renames_the_op_namespace():
    source = (
        "from due_ext.data.axes import foreground_slices\n"
        "    from due_ext import __version__\n"
        "x = importlib.import_module('due_ext._C')\n"
        'torch.library.custom_op("due_ext::op_triton", mutates_args=())\n'
        "y = torch.ops.due_ext.op_triton\n"
    )
    out = _rewrite_source(source, "due_ext.ops.ddim", is_package=False)
    assert "from ..data.axes import foreground_slices" in out
    assert "    from .. import __version__" in out
    assert "import_module('scripts.due_ext._C')" in out
    assert '"due_ext_bundle::op_triton"' in out and "torch.ops.due_ext_bundle.op_triton" in out
    with pytest.raises(ValueError, match="cannot be vendored"):
        _rewrite_source("import due_ext.data\n", "due_ext.x", is_package=False)


# Without the `export` extra, MONAI's verify_metadata dies with "TypeError: catching classes that do not inherit
# from BaseException" (its `except ValidationError` names a placeholder of the missing jsonschema). A module set to
# None in sys.modules cannot be imported, which is what an environment without jsonschema looks like to both.
_WITHOUT_JSONSCHEMA = "import sys; sys.modules['jsonschema'] = None; "


def test_export_without_the_export_extra_names_it_in_one_line(tmp_path):
    out = tmp_path / "interpolator"
    command = ["bundle", "export", "interpolator", "--out", str(out)]
    code = _WITHOUT_JSONSCHEMA + f"from due_ext.cli import main; main({command!r})"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "jsonschema" in lines[0] and "'export' extra" in lines[0]
    assert f"-e '{REPO}[export]'" in lines[0]  # this checkout's install command
    assert not out.exists() and list(tmp_path.iterdir()) == []  # checked before anything is written


def test_metadata_check_without_the_export_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "jsonschema", None)
    with pytest.raises(MissingExtraError, match=r"jsonschema from the 'export' extra"):
        verify_bundle_metadata(REPO / "bundles" / "interpolator" / "metadata.json")


def test_install_command_fits_where_due_ext_lives(tmp_path):
    assert install_command("export") == f"pip install --no-build-isolation -e '{REPO}[export]'"
    copy = tmp_path / "scripts" / "due_ext"  # an exported bundle's vendored copy: no build files beside it
    copy.mkdir(parents=True)
    assert install_command("triton", copy) == "pip install 'due-ext[triton]'"
    with pytest.raises(ValueError, match="not an optional extra"):
        missing_modules("gpu")
