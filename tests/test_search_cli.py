"""``simsiam search``: neighbours as a table and JSON, a PNG contact sheet, retrieval metrics, errors."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retrieval.contact_sheet import sheet_size
from retrieval.features import read_features
from retrieval.metrics import retrieval_metrics
from simsiam.errors import InputError

from conftest import make_image_folder
from feature_files import assert_user_error, clustered, feature_file, run, save_resnet18_checkpoints

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = ["--image-size", "16", "--resize", "0", "--workers", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    """Images, a checkpoint, the images' feature file and an index over it."""
    root = tmp_path_factory.mktemp("search")
    checkpoint = save_resnet18_checkpoints(root / "ckpt")["torchvision"]
    images = make_image_folder(root / "images", classes=3, per_class=5)
    feats = root / "gallery.h5"
    assert run("extract", checkpoint, images, "--out", feats, "--dtype", "float32", *FAST).exit_code == 0
    assert run("index", feats, "--out", root / "gallery.index", "--kind", "flat").exit_code == 0
    return {"root": root, "checkpoint": checkpoint, "images": images, "h5": feats, "index": root / "gallery.index"}


def test_query_image_of_the_database_finds_its_neighbours_not_itself(gallery):
    query = gallery["images"] / "class1" / "c1_002.png"
    common = ["--query", query, "--checkpoint", gallery["checkpoint"], "-k", "4", "--workers", "0", "--device", "cpu"]
    result = run("search", gallery["h5"], *common, "--json")
    assert result.exit_code == 0, result.output
    found = json.loads(result.output.strip().splitlines()[-1])
    [q] = found["queries"]
    assert found["excluded_self"] is True and found["queries_in_database"] == 1
    assert q["path"] == "c1_002.png" and len(q["neighbours"]) == 4
    assert "class1/c1_002.png" not in [n["path"] for n in q["neighbours"]]
    scores = [n["score"] for n in q["neighbours"]]
    assert scores == sorted(scores, reverse=True) and scores[0] < 1 - 1e-4
    # the same neighbours as the image's row of the feature file searched against the file itself
    everyone = json.loads(run("search", gallery["h5"], "--query-h5", gallery["h5"], "-k", "4", "--json").output)
    [row] = [r for r in everyone["queries"] if r["path"] == "class1/c1_002.png"]
    assert [n["path"] for n in row["neighbours"]] == [n["path"] for n in q["neighbours"]]
    table = run("search", gallery["index"], *common)  # the index finds the same, as a table
    assert table.exit_code == 0, table.output
    rows = [line.split("│")[1:-1] for line in table.output.splitlines() if line.startswith("│")]
    assert [r[3].strip() for r in rows] == [n["path"] for n in q["neighbours"]]
    assert rows[0][0].strip() == "c1_002.png" and "1 of them database images, left out" in table.output


def test_query_images_follow_a_database_made_before_extract_refused_a_resize_below_the_crop(gallery, tmp_path):
    """Such a file's rows were padded by the centre crop; the queries must be made the same way, not refused."""
    import shutil

    import h5py

    old = tmp_path / "old.h5"
    shutil.copy(gallery["h5"], old)
    with h5py.File(old, "r+") as f:
        f.attrs["image_size"], f.attrs["resize"] = 20, 18
    query = gallery["images"] / "class1" / "c1_002.png"
    result = run("search", old, "--query", query, "--checkpoint", gallery["checkpoint"], "-k", "2", "--workers", "0",
                 "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output


def test_the_database_images_reached_another_way_do_not_find_themselves(gallery, tmp_path):
    """A copy of the database file, or its image folder embedded again: --eval is not inflated by self-matches."""
    import shutil

    copy = shutil.copy(gallery["h5"], tmp_path / "copy.h5")
    reference = json.loads(run("search", gallery["h5"], "--query-h5", gallery["h5"], "--eval", "--json").output)
    embed = ["--checkpoint", gallery["checkpoint"], "--workers", "0", "--device", "cpu"]
    for queries in (["--query-h5", copy], ["--query", gallery["images"], *embed]):
        result = run("search", gallery["h5"], *queries, "--eval", "--json")
        assert result.exit_code == 0, result.output
        found = json.loads(result.output.strip().splitlines()[-1])
        assert found["queries_in_database"] == 15
        for mine, theirs in zip(found["queries"], reference["queries"]):
            assert [n["path"] for n in mine["neighbours"]] == [n["path"] for n in theirs["neighbours"]]
        assert found["metrics"] == pytest.approx(reference["metrics"])
    # a class folder of the database's images (paths relative to another root) is matched too
    result = run("search", gallery["h5"], "--query", gallery["images"] / "class2", *embed, "--json")
    found = json.loads(result.output.strip().splitlines()[-1])
    assert found["queries_in_database"] == 5
    assert all(f"class2/{q['path']}" not in [n["path"] for n in q["neighbours"]] for q in found["queries"])
    # images added to the folder after the extraction are not in the database: they keep every row,
    # and a copy of a database image (another file) finds the original
    images = make_image_folder(tmp_path / "grown", classes=3, per_class=2)
    assert run("extract", gallery["checkpoint"], images, "--out", tmp_path / "grown.h5", *FAST).exit_code == 0
    for image in sorted(images.glob("*/*_000.png")):  # copies: other files, of the same pixels
        shutil.copy(image, image.with_name(f"new_{image.name}"))
    result = run("search", tmp_path / "grown.h5", "--query", images, *embed, "-k", "5", "--json")
    assert result.exit_code == 0, result.output
    found = json.loads(result.output.strip().splitlines()[-1])
    assert found["queries_in_database"] == 6 and len(found["queries"]) == 9
    for q in found["queries"]:
        paths = [n["path"] for n in q["neighbours"]]
        assert q["path"] not in paths and len(paths) == 5  # the 5 other rows, or 5 of the 6 for a new image
        if q["path"].split("/")[1].startswith("new_"):
            assert q["neighbours"][0]["path"] == q["path"].replace("new_", "") and q["neighbours"][0]["score"] > 0.9999


def test_grid_png_decodes_and_has_the_expected_size(gallery, tmp_path):
    grid = tmp_path / "grid.png"
    result = run("search", gallery["h5"], "--query", gallery["images"], "--checkpoint", gallery["checkpoint"], "-k", "3",
                 "--grid", grid, "--grid-rows", "4", "--workers", "0", "--device", "cpu")
    assert result.exit_code == 0, result.output
    with Image.open(grid) as image:
        image.load()
        assert image.format == "PNG" and image.size == sheet_size(15, 3, 4) == (640, 640)
        pixels = np.asarray(image.convert("RGB"))
    # the query's frame is black and a correct neighbour's green: the sheet holds more than a background
    assert (pixels == 0).all(axis=2).any() and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50
    # never drawn over an input: the query image itself, or an image of the query folder
    query = gallery["images"] / "class1" / "c1_002.png"
    before = query.read_bytes()
    for images in (query, gallery["images"]):
        assert_user_error(run("search", gallery["h5"], "--query", images, "--checkpoint", gallery["checkpoint"],
                              "--grid", query), "--grid", "is an input of this command")
    assert query.read_bytes() == before
    assert "could not be read" not in result.output
    # nor added to the query folder, where it would be one more image of it for every later scan
    for where in (gallery["images"] / "sheet.png", gallery["images"] / "class1" / "sheet.png"):
        assert_user_error(run("search", gallery["h5"], "--query", gallery["images"], "--checkpoint",
                              gallery["checkpoint"], "--grid", where),
                          f"--grid {where}: is inside {gallery['images']}, a folder of images this command reads")
        assert not where.exists()
    # the folder the database was extracted from: its images are drawn, and it would get one more
    where = gallery["images"] / "class0" / "sheet.png"
    assert_user_error(run("search", gallery["h5"], "--query-h5", gallery["h5"], "-k", "3", "--grid", where),
                      f"--grid {where}: is inside {gallery['images'].resolve()}, a folder of images", only_line=False)
    assert not where.exists()


def test_grid_titles_name_each_neighbours_score_and_class(gallery, tmp_path, monkeypatch):
    from retrieval import contact_sheet

    titles, draw = [], contact_sheet._cell
    monkeypatch.setattr(contact_sheet, "_cell", lambda ax, image, title, frame: (titles.append(title),
                                                                                 draw(ax, image, title, frame)))
    result = run("search", gallery["h5"], "--query-h5", gallery["h5"], "-k", "2", "--json",
                 "--grid", tmp_path / "grid.png", "--grid-rows", "3")
    assert result.exit_code == 0, result.output
    found = json.loads(result.output.strip().splitlines()[-1])["queries"][:3]
    assert titles == [title for q in found for title in
                      [q["path"], *(f"{n['score']:.3f} {n['path'].split('/')[0]}" for n in q["neighbours"])]]


def test_grid_says_when_the_database_images_are_not_where_the_file_says(gallery, tmp_path):
    import shutil

    import h5py

    moved = shutil.copy(gallery["h5"], tmp_path / "moved.h5")
    with h5py.File(moved, "r+") as f:
        f.attrs["root"] = str(tmp_path / "elsewhere")  # extracted on another machine, say
    result = run("search", moved, "--query", gallery["images"] / "class0", "--checkpoint", gallery["checkpoint"],
                 "-k", "2", "--grid", tmp_path / "g.png", "--device", "cpu")
    assert result.exit_code == 0, result.output
    found = json.loads(run("search", moved, "--query", gallery["images"] / "class0", "--checkpoint",
                           gallery["checkpoint"], "-k", "2", "--device", "cpu", "--json").output.splitlines()[-1])
    neighbours = {n["path"] for q in found["queries"] for n in q["neighbours"]}  # every one of them is missing
    assert (f"warning: --grid: {len(neighbours)} image(s) could not be read and are drawn as 'missing'"
            in result.output)
    assert str(tmp_path / "elsewhere") in result.output and (tmp_path / "g.png").is_file()


def test_eval_reports_recall_and_map_leaving_each_query_out(gallery):
    result = run("search", gallery["h5"], "--query-h5", gallery["h5"], "--eval", "-k", "4", "--json")
    assert result.exit_code == 0, result.output
    found = json.loads(result.output)
    assert found["excluded_self"] is True
    assert all(q["neighbours"][0]["path"] != q["path"] for q in found["queries"])
    metrics = found["metrics"]
    assert set(metrics) == {"recall@1", "recall@5", "recall@10", "mAP@4", "queries_evaluated", "queries_left_out"}
    assert metrics["queries_evaluated"] == 15 and 0 < metrics["recall@1"] <= metrics["recall@5"] <= metrics["recall@10"]
    text = run("search", gallery["h5"], "--query-h5", gallery["h5"], "--eval", "-k", "4")
    assert f"recall@1 {metrics['recall@1']:.4f}" in text.output and "12 more queries" in text.output


def test_metrics_by_hand():
    # query 0 (label 1): relevant at ranks 1 and 3 of 4, 2 relevant in all -> AP@4 = (1/1 + 2/3) / 2
    # query 1 (label 2): relevant at rank 2, 3 relevant in all -> AP@4 = (1/2) / 3
    database = np.array([1, 1, 2, 2, 2, 0])
    neighbours = np.array([[1, 0, 1, 2], [0, 2, 0, 0]])
    m = retrieval_metrics(np.array([1, 2]), np.hstack([neighbours, np.zeros((2, 6), int)]), database, map_k=4)
    assert m["recall@1"] == 0.5 and m["recall@5"] == 1.0
    assert m["mAP@4"] == pytest.approx(((1 + 2 / 3) / 2 + (1 / 2) / 3) / 2)
    with pytest.raises(InputError, match="no query has a label"):
        retrieval_metrics(np.array([-1, 7]), np.zeros((2, 10), int), database)


def test_query_h5_of_a_different_layer_or_dimension_is_refused(gallery, tmp_path):
    other = feature_file(tmp_path / "q.h5", *clustered(5, dim=16))
    assert_user_error(run("search", gallery["h5"], "--query-h5", other), "16-d features", "has 512-d")


def test_undecodable_query_image(gallery, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    result = run("search", gallery["index"], "--query", broken, "--checkpoint", gallery["checkpoint"],
                 "--grid", tmp_path / "grid.png", "--workers", "0", "--device", "cpu")
    assert_user_error(result, "--query", "broken.jpg: cannot decode the image", only_line=False)
    assert not (tmp_path / "grid.png").exists()


def test_a_grid_of_names_the_font_cannot_draw_warns_nothing(gallery, tmp_path, recwarn):
    # matplotlib's UserWarning per missing glyph, with a source line, came out among our own lines
    import shutil
    import warnings

    warnings.simplefilter("always")
    (tmp_path / "q").mkdir()
    query = tmp_path / "q" / "猫の写真.png"
    shutil.copy(gallery["images"] / "class1" / "c1_002.png", query)
    result = run("search", gallery["h5"], "--query", query, "--checkpoint", gallery["checkpoint"], "-k", "2",
                 "--grid", tmp_path / "g.png", "--workers", "0", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "g.png").stat().st_size > 0
    assert not [w for w in recwarn if "Glyph" in str(w.message)]


def test_a_grid_that_is_not_a_png_is_refused_before_any_work(gallery, tmp_path, monkeypatch):
    # it was refused only once every query was embedded and searched
    import retrieval.search

    monkeypatch.setattr(retrieval.search, "find_neighbours", lambda *a, **k: pytest.fail("searched"))
    assert_user_error(run("search", gallery["h5"], "--query-h5", gallery["h5"], "--grid", tmp_path / "g.jpg"),
                      f"--grid {tmp_path / 'g.jpg'}: must end in .png")


def test_a_feature_file_as_query_image_points_to_query_h5_before_loading_the_checkpoint(gallery, monkeypatch):
    import retrieval.feature_model  # where the search imports it from, when it embeds

    monkeypatch.setattr(retrieval.feature_model, "load_feature_model", lambda *a, **k: pytest.fail("loaded"))
    result = run("search", gallery["index"], "--query", gallery["h5"], "--checkpoint", gallery["checkpoint"])
    assert_user_error(result, f"--query {gallery['h5']}: a feature file, not an image; search with its features: "
                      f"--query-h5 {gallery['h5']}")


@pytest.mark.parametrize("k, expected", [("0", "-k 0: must be at least 1"),
                                         ("16", "-k 16: larger than the 15 database images"),
                                         ("3", "--eval: recall@10 needs 10 neighbours per query, more than the 8 database images")])
def test_a_k_the_database_cannot_give_is_refused_before_embedding_the_queries(gallery, tmp_path, monkeypatch, k,
                                                                             expected):
    import retrieval.extract  # where the search imports it from, when it embeds

    database = gallery["h5"]
    if k == "3":
        database = feature_file(tmp_path / "small.h5", *clustered(8, classes=2, dim=512))
    monkeypatch.setattr(retrieval.extract, "extract_features", lambda *a, **kw: pytest.fail("embedded"))
    result = run("search", database, "--query", gallery["images"], "--checkpoint", gallery["checkpoint"], "-k", k,
                 *(["--eval"] if k == "3" else []), *FAST[-4:])
    assert_user_error(result, expected)


def test_eval_with_query_images_without_a_class_of_the_database_is_refused_before_embedding(gallery, tmp_path,
                                                                                           monkeypatch):
    import retrieval.extract  # where the search imports it from, when it embeds

    monkeypatch.setattr(retrieval.extract, "extract_features", lambda *a, **kw: pytest.fail("embedded"))
    other = make_image_folder(tmp_path / "other", classes=1, per_class=2)
    (other / "class0").rename(other / "dogs")
    for query, expected in ((gallery["images"] / "class1", "--eval: the --query images have no labels"),
                            (gallery["images"] / "class1" / "c1_002.png", "--eval: the --query images have no labels"),
                            (other, f"--eval: none of the --query classes (dogs) is a class of the database "
                                    f"{gallery['h5']}")):
        result = run("search", gallery["h5"], "--query", query, "--checkpoint", gallery["checkpoint"], "--eval",
                     "-k", "3", *FAST[-4:])
        assert_user_error(result, expected)


def test_an_empty_query_image_says_it_is_empty(gallery, tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.touch()
    result = run("search", gallery["h5"], "--query", empty, "--checkpoint", gallery["checkpoint"], "--workers", "0",
                 "--device", "cpu")
    assert_user_error(result, f"--query {empty}: cannot decode the image (empty file: 0 bytes)", only_line=False)


def test_a_query_folder_with_a_class_folder_name_that_is_not_utf8_is_refused_by_name(gallery, tmp_path):
    query = Path(os.fsdecode(os.fsencode(tmp_path) + b"/caf\xe9"))
    query.mkdir()
    (query / "a.png").write_bytes((gallery["images"] / "class1" / "c1_002.png").read_bytes())
    result = run("search", gallery["h5"], "--query", tmp_path, "--checkpoint", gallery["checkpoint"], *FAST[-4:])
    assert_user_error(result, f"{tmp_path}/caf\\xe9: the folder name is not valid UTF-8", "rename it")


def test_other_errors(gallery, tmp_path):
    assert_user_error(run("search", tmp_path / "none.index", "--query-h5", gallery["h5"]), "no such index")
    assert_user_error(run("search", gallery["h5"], "--query", gallery["images"]), "needs --checkpoint")
    assert_user_error(run("search", gallery["h5"], "--query-h5", gallery["h5"], "-k", "15"),
                      "-k 15: larger than the 14 database images a query can find (its own image is left out)")
    stray = tmp_path / "stray.index"
    stray.write_bytes((gallery["index"]).read_bytes())
    assert_user_error(run("search", stray, "--query-h5", gallery["h5"]), "no stray.index.json beside it")
    table = tmp_path / "table.csv"
    table.write_text("path,label\na.jpg,0\n")
    assert_user_error(run("search", table, "--query-h5", gallery["h5"]),
                      "table.csv: neither a feature file (HDF5) nor an index from simsiam index")
    assert_user_error(run("search", gallery["checkpoint"], "--query-h5", gallery["h5"]),
                      "a checkpoint, not a feature file or an index; simsiam extract")
    assert_user_error(run("search", gallery["images"], "--query-h5", gallery["h5"]),
                      f"{gallery['images']}: a folder, not a feature file or an index")
    assert_user_error(run("search", f"{gallery['index']}.json", "--query-h5", gallery["h5"]),
                      f"{gallery['index']}.json: the description of the index {gallery['index']}, not the index; "
                      f"search {gallery['index']}")
    assert read_features(gallery["h5"]).dim == 512


def test_errors_about_a_path_name_the_option_that_gave_it(gallery, tmp_path):
    """The readers name the bare path; the message names the option as well, as the user typed it."""
    query = gallery["images"] / "class1" / "c1_002.png"
    empty = tmp_path / "empty"
    empty.mkdir()
    for args, expected in (
            (["--query", query, "--checkpoint", tmp_path / "none.pth"], f"--checkpoint {tmp_path / 'none.pth'}: no such"),
            (["--query", query, "--checkpoint", gallery["h5"]], f"--checkpoint {gallery['h5']}: an HDF5 file"),
            (["--query", query, "--checkpoint", tmp_path], f"--checkpoint {tmp_path}: is a folder"),
            (["--query", empty, "--checkpoint", gallery["checkpoint"]], f"--query {empty}: no images found"),
            (["--query-h5", tmp_path / "none.h5"], f"--query-h5 {tmp_path / 'none.h5'}: no such feature file"),
            (["--query-h5", gallery["checkpoint"]], f"--query-h5 {gallery['checkpoint']}: a checkpoint"),
            (["--query-h5", tmp_path], f"--query-h5 {tmp_path}: not a file")):
        assert_user_error(run("search", gallery["h5"], *args, "--device", "cpu"), expected)



@pytest.mark.parametrize("sidecar", ["[1, 2]", '"flat"', '{"format": "simsiam-index/1", "features": 3, "rows": 14}'])
def test_a_foreign_index_sidecar_is_refused_in_one_line(gallery, tmp_path, sidecar):
    index = tmp_path / "x.index"
    index.write_bytes(gallery["index"].read_bytes())
    (tmp_path / "x.index.json").write_text(sidecar)
    assert_user_error(run("search", index, "--query-h5", gallery["h5"]),
                      "x.index.json: not an index description written by simsiam index")

def test_conflicting_options_and_another_network_are_refused_before_any_work(gallery, tmp_path):
    from feature_files import clustered, feature_file

    query = gallery["images"] / "class1" / "c1_002.png"
    assert_user_error(run("search", gallery["h5"], "--query-h5", gallery["h5"], "--checkpoint", gallery["checkpoint"]),
                      "--query-h5 holds features already")
    for option, value in (("--batch-size", "8"), ("--workers", "2"), ("--precision", "fp32")):  # silently ignored
        assert_user_error(run("search", gallery["h5"], "--query-h5", gallery["h5"], option, value),
                          f"{option}: embeds --query images; --query-h5 holds features already")
    assert_user_error(run("search", gallery["index"], "--query-h5", gallery["h5"], "--backend", "torch"),
                      "--backend torch: an index searches itself")
    assert_user_error(run("search", gallery["index"], "--query-h5", gallery["h5"], "--device", "cuda"),
                      "--device cuda: an index is searched by FAISS on the CPU")  # was ignored, in silence
    small = feature_file(tmp_path / "small.h5", *clustered(20, classes=2, dim=64))
    assert_user_error(run("search", small, "--query", query, "--checkpoint", gallery["checkpoint"]),
                      "resnet18 gives 512-d features, but the database", "has 64-d")
    nan = feature_file(tmp_path / "nan.h5", np.full((3, 512), np.nan, np.float32))
    assert_user_error(run("search", gallery["h5"], "--query-h5", nan), f"--query-h5 {nan}")


def test_a_broken_transform_in_the_database_file_is_blamed_on_the_file(gallery, tmp_path):
    import shutil

    import h5py

    database = shutil.copy(gallery["h5"], tmp_path / "db.h5")
    with h5py.File(database, "r+") as f:
        f.attrs["image_size"] = 10**6  # was reported as "--image-size 1000000", an option not given
    query = gallery["images"] / "class1" / "c1_002.png"
    assert_user_error(run("search", database, "--query", query, "--checkpoint", gallery["checkpoint"]),
                      f"{database}: its image_size 1000000: must be at most 4096")


def test_projector_features_with_a_checkpoint_without_projector_advise_what_search_can_do(gallery, tmp_path):
    """search has no --layer: the database's layer is the one used, so the advice is another checkpoint or database."""
    projector = feature_file(tmp_path / "proj.h5", *clustered(6, classes=2, dim=64), layer="projector",
                             checkpoint="runs/official.pth.tar")
    result = run("search", projector, "--query", gallery["images"] / "class1" / "c1_002.png",
                 "--checkpoint", gallery["checkpoint"], "-k", "3", "--workers", "0", "--device", "cpu")
    assert_user_error(result, f"--checkpoint {gallery['checkpoint']}: has no SimSiam projector",
                      f"the database {projector} holds projector features",
                      "give --checkpoint the checkpoint they were extracted from (runs/official.pth.tar)",
                      "simsiam extract --layer backbone")


def test_an_index_used_with_another_feature_file_of_the_same_length_is_refused(gallery, tmp_path):
    import shutil

    from retrieval.features import FeatureSet, write_features

    feats = tmp_path / "feats.h5"
    shutil.copyfile(gallery["h5"], feats)
    assert run("index", feats, "--out", tmp_path / "feats.index", "--kind", "flat").exit_code == 0
    assert run("search", tmp_path / "feats.index", "--query-h5", gallery["h5"], "-k", "3").exit_code == 0
    original = read_features(feats)
    reordered = FeatureSet(original.features[::-1].copy(), original.labels[::-1].copy(), original.paths[::-1],
                           original.attrs)
    write_features(feats, reordered)  # same rows, another order: the index's row i is no longer image i
    assert_user_error(run("search", tmp_path / "feats.index", "--query-h5", gallery["h5"]),
                      "is not the feature file it was built over", "rebuild the index")
    # another extraction of the same images, in the same order: same paths, other vectors
    other = FeatureSet(original.features * 0.5 + 0.1, original.labels, original.paths, original.attrs)
    write_features(feats, other)
    assert_user_error(run("search", tmp_path / "feats.index", "--query-h5", gallery["h5"]),
                      "is not the feature file it was built over")


def test_paths_are_printed_as_they_are_whole_when_the_output_is_no_terminal(tmp_path):
    """rich took "[red]" in a path for markup and dropped it, and folded lines and table cells at 80
    columns in a file or a pipe (a path split over two lines is not found by grep)."""
    long_class = "a_class_named_at_length_" + "x" * 70
    features, labels = clustered(6, classes=2, dim=8, seed=3)
    path = feature_file(tmp_path / "odd.h5", features, labels, classes=["[red]", long_class])
    result = run("search", path, "--query-h5", path, "-k", "2")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert any("[red]/img" in line for line in lines)
    assert any(f"{long_class}/img" in line for line in lines)  # whole, on one line
    assert any(line.strip().startswith(f"6 queries, 2 nearest in {path}")  # the table's title, centred
               and line.strip().endswith("left out of their own results") for line in lines)


def test_one_query_is_one_query(tmp_path):
    features, labels = clustered(6, classes=2, dim=8, seed=3)
    database = feature_file(tmp_path / "db.h5", features, labels)
    query = feature_file(tmp_path / "q.h5", features[:1] + 0.01, labels[:1])
    result = run("search", database, "--query-h5", query, "-k", "2")
    assert result.exit_code == 0, result.output
    assert any(line.strip().startswith(f"1 query, 2 nearest in {database}") for line in result.output.splitlines())
