"""Command-line interface, built with ``fire``: ``python -m due_ext <group> <command> --help``.

Each group is a class whose public methods are commands; their docstrings are the ``--help`` text. Heavy
imports happen inside commands so that ``--help`` stays fast.
"""

from __future__ import annotations

import sys

import fire

from due_ext.extras import MissingExtraError


class DataCommands:
    """Build demo datasets and validate datalists."""

    def build(self, name: str, out: str, n_pos: int | None = None, n_neg: int | None = None,
              size: str | None = None, every_k: int | None = None, seed: int = 0,
              preview: bool = False, val_fraction: float | None = None, margin: tuple[float, float] | None = None,
              jitter: float | None = None) -> None:
        """Build a dataset of NIfTI volumes and a Decathlon-style datalist.json in OUT.

        Args:
            name: "phantom" (procedural, no download) or "lung-ct" (real chest-CT backgrounds with inserted
                nodules; downloads the pyradiomics 3.0.1 sources into the cache on first use).
            out: output folder; datalist.json is written there.
            n_pos: number of positives (lesion, sparse annotation); builder default if omitted.
            n_neg: number of negatives; builder default if omitted.
            size: volume size "X,Y,Z"; builder default if omitted.
            every_k: keep every k-th axial (Z) slice of each lesion mask as annotated (first and last
                lesion slice always kept).
            seed: random seed; the same seed gives the same dataset.
            preview: also write preview.png (positives and negatives, annotated slices outlined).
            val_fraction: share of each class in validation, taken from training ("bounded" only; 0.25).
            margin: "LOW,HIGH", range of the crop extent over the lesion box ("bounded" only; 1.2,2.0).
            jitter: largest shift of the crop centre, fraction of the free room per side ("bounded" only; 0.5).
        """
        from due_ext.data.builders import build_dataset

        summary = build_dataset(name, out, n_pos=n_pos, n_neg=n_neg, size=size, every_k=every_k,
                                seed=seed, preview=preview, val_fraction=val_fraction, margin=margin,
                                jitter=jitter)
        print(summary)

    def check(self, datalist: str, dataset_dir: str | None = None) -> None:
        """Validate DATALIST: every file, shape, affine, label and annotated slice.

        Prints a one-line summary when everything is valid; otherwise prints every problem found (each
        naming the file, the item and the problem) and exits with status 1.

        Args:
            datalist: path of a datalist JSON (sections training/validation/test).
            dataset_dir: folder that relative paths are resolved against (default: the datalist's folder).
        """
        from due_ext.data.validate import check_datalist

        report = check_datalist(datalist, dataset_dir=dataset_dir)
        for note in report.notes:  # accepted but worth knowing, e.g. a squeezed trailing singleton dimension
            print(f"note: {note}", file=sys.stderr)
        if report.problems:
            for problem in report.problems:
                print(problem, file=sys.stderr)
            print(f"{datalist}: {len(report.problems)} problem(s) found", file=sys.stderr)
            sys.exit(1)
        print(report.summary())

    def _import(self, images: str, out: str, labels: str | None = None, labels_csv: str | None = None,
                label_suffix: str = "", segments: str | None = None, empty_slices: str | None = None,
                patient_column: str = "patient", patient_regex: str | None = None,
                fractions: str = "0.7,0.15,0.15", seed: int = 0, name: str | None = None) -> None:
        """Import a folder of scans and sparse drawings as a datalist OUT (see docs/your_data.md).

        Reads NIfTI, NRRD (3D Slicer .seg.nrrd too), DICOM series folders and DICOM SEG (`dicom` extra); pairs
        images and labels by case id (file name without extension); annotated_slices are the axial (Z) slices
        holding a drawing. Checks everything first: on any problem it prints every problem (each naming the
        file), writes nothing and exits with status 1. Non-NIfTI volumes are copied as NIfTI into
        <OUT stem>_nifti/ beside OUT; paths in OUT are relative to its folder.

        Args:
            images: folder of scans (NIfTI or NRRD files, or one folder per DICOM series).
            out: datalist JSON to write.
            labels: folder of drawings named like the images (plus LABEL_SUFFIX); optional.
            labels_csv: CSV with columns case,label[,patient]; an empty label leaves the case out. Without it a
                case is positive when it has a drawing and negative when it has no label file.
            label_suffix: ending of label names after the case id, e.g. "_seg".
            segments: comma-separated segment names of .seg.nrrd / DICOM SEG files that make the drawing
                (default: all segments merged).
            empty_slices: JSON {"case": [z, ...]} of axial slices looked at and left empty (annotated, no
                foreground).
            patient_column: CSV column with the patient id; the split keeps a patient's cases together.
            patient_regex: regular expression on the case id giving the patient id (first group, else the
                whole match) when the CSV has no patient column.
            fractions: training,validation,test fractions of patients.
            seed: seed of the split.
            name: the datalist's name (default: OUT's stem).
        """
        from due_ext.data.importing import DataImportError, import_dataset

        def text(value):  # fire turns "a,b" into a tuple
            return ",".join(map(str, value)) if isinstance(value, (tuple, list)) else value

        names = None if segments is None else [s.strip() for s in str(text(segments)).split(",") if s.strip()]
        try:
            summary = import_dataset(text(images), text(out), labels=text(labels), labels_csv=text(labels_csv),
                                     label_suffix=label_suffix, segments=names, empty_slices=text(empty_slices),
                                     patient_column=patient_column, patient_regex=patient_regex,
                                     fractions=text(fractions), seed=seed,
                                     name=None if name is None else str(text(name)))
        except DataImportError as err:
            for problem in err.problems:
                print(problem, file=sys.stderr)
            print(f"{len(err.problems)} problem(s) found; nothing written", file=sys.stderr)
            sys.exit(1)
        except ValueError as err:  # malformed options: fractions, regex
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        print(summary)


# `import` is a Python keyword, so the command's method is bound under that name here.
setattr(DataCommands, "import", DataCommands._import)


class InterpCommands:
    """Evaluate slice interpolators (diffusion and the classical peers)."""

    def evaluate(self, masks: str, every_k: str = "2,3,4", methods: str = "all",
                 axis: int = 2, out: str = "results.json", sections: str = "test", model_path: str | None = None,
                 steps: int = 10, eta: float = 1.0, repeats: int = 8, seed: int = 0, bf16: bool = False) -> None:
        """Sparsify full 3D masks (every k-th slice between the first and last foreground slice), fill them back
        with each method and report Dice on the missing slices and on the whole mask, per k and method.

        Args:
            masks: a folder of NIfTI masks, or a datalist whose items have a "mask" volume.
            every_k: slice steps to test, e.g. "2,3,4".
            methods: "all" (diffusion and every classical peer; morphological only when the itk extra is
                installed) or any of diffusion, sdf, morphological, linear_union, linear, nearest (comma-separated).
            axis: array axis of the slices (2 = the stored third axis, Z).
            out: results JSON; the markdown table is written beside it (.md).
            sections: datalist sections to read (ignored for a folder).
            model_path: diffusion weights (default: bundles/interpolator/models/model.pt).
            steps, eta, repeats, seed, bf16: diffusion sampler settings.
        """
        from due_ext.interp.evaluate import markdown_table, run_evaluation

        results = run_evaluation(masks, every_k, methods, axis=axis, out=out, sections=sections,
                                 model_path=model_path, steps=steps, eta=eta, repeats=repeats, seed=seed, bf16=bf16)
        print(markdown_table(results))
        print(f"results: {out}")


    def real_masks(self, out: str) -> None:
        """Write the real-anatomy evaluation masks (five pyradiomics tumour drawings, seven structures of the MNI
        ICBM 2009a template shipped in the nilearn wheel; downloaded from PyPI into the cache on first use) as
        NIfTI files into OUT, for `interp evaluate --masks OUT` and `uncertainty evaluate --masks OUT`."""
        from due_ext.interp.real_masks import build_real_masks

        for path in build_real_masks(out):
            print(path)


class UncertaintyCommands:
    """Evaluate the uncertainty predictor (neural-process VAE) against the diffusion variance and cheap baselines."""

    def evaluate(self, masks: str, every_k: str = "2,3,4", axis: int = 2, out: str = "results.json",
                 sections: str = "test", model_path: str | None = None, interpolator_path: str | None = None,
                 steps: int = 10, eta: float = 1.0, repeats: int = 8, seed: int = 0, bf16: bool = False) -> None:
        """Sparsify full 3D masks as `interp evaluate` does, then report the Spearman correlation between the
        predicted and the diffusion variance and the AUROC of each variance, edge proximity and classical
        disagreement for the voxels where the diffusion interpolation is wrong, per k.

        Args:
            masks: a folder of NIfTI masks, or a datalist whose items have a "mask" volume.
            every_k: slice steps to test, e.g. "2,3,4".
            axis: array axis of the slices (2 = the stored third axis, Z).
            out: results JSON; the markdown table is written beside it (.md).
            sections: datalist sections to read (ignored for a folder).
            model_path: predictor weights (default: bundles/uncertainty/models/model.pt).
            interpolator_path: diffusion weights (default: bundles/interpolator/models/model.pt).
            steps, eta, repeats, seed, bf16: diffusion sampler settings (defaults: the interpolator's).
        """
        from due_ext.uncertainty.evaluate import markdown_table, run_evaluation

        results = run_evaluation(masks, every_k, axis=axis, out=out, sections=sections, model_path=model_path,
                                 interpolator_path=interpolator_path, steps=steps, eta=eta, repeats=repeats,
                                 seed=seed, bf16=bf16)
        print(markdown_table(results))
        print(f"results: {out}")


class BundleCommands:
    """Share the bundles: export them in the MONAI model-zoo layout."""

    def export(self, name: str, out: str, zip: bool = False, large_file_mb: float = 25.0,
               model: str | None = None) -> None:
        """Write bundles/NAME as a self-contained model-zoo bundle in OUT (configs/, models/, scripts/, docs/,
        LICENSE, large_files.yml where a file is over LARGE_FILE_MB); it runs without due_ext installed.

        Args:
            name: due, interpolator or uncertainty.
            out: output folder (replaced if it exists).
            zip: also write OUT.zip (the bundle folder inside, as the model zoo publishes it).
            large_file_mb: size above which a file is listed in large_files.yml (model zoo: 25 MB).
            model: weights to ship as models/model.pt (default: bundles/NAME/models/model.pt; the DUE
                bundle's is bundles/due/models/due/model.pt, written by its training, e.g. `make demo`).
        """
        from due_ext.export import export_bundle

        try:
            summary = export_bundle(name, out, zip=zip, large_file_mb=large_file_mb, model=model)
        except (FileNotFoundError, ValueError) as err:  # a wrong name, missing weights, metadata off the schema
            print(f"error: {err}", file=sys.stderr)
            sys.exit(1)
        print(f"{name}: exported to {summary['path']} ({len(summary['modules'])} vendored modules, "
              f"metadata verified)" + (f"; archive {summary['zip']}" if summary["zip"] else ""))
        for path in summary["large_files"]:
            print(f"large file listed in large_files.yml: {path}")


class ExperimentCommands:
    """Run experiment grids (methods x seeds x training-set sizes x lambda) and report them like the paper."""

    def run(self, config: str, out: str, workers: int = 1, threads: int = 1, timeout: float | None = None) -> None:
        """Train and evaluate every unfinished cell of the experiment CONFIG into OUT (resumable: a cell with a
        result row is skipped, any other is run again from scratch).

        Args:
            config: experiment file, YAML or JSON (see experiments/README.md for the format).
            out: output folder (rows in OUT/cells/*/result.json and OUT/results.jsonl).
            workers: cells run at the same time, each in its own process.
            threads: torch/OpenMP threads per cell (1 when the cores are shared).
            timeout: seconds after which a cell is stopped and counted as failed (default: no limit).
        """
        from due_ext.experiments import ExperimentConfigError, run_experiment

        try:
            summary = run_experiment(config, out, workers=workers, threads=threads, timeout=timeout)
        except ExperimentConfigError as err:  # the message names the file and the key
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        print(f"{out}: {len(summary['finished'])} cells run, {len(summary['skipped'])} already finished, "
              f"{len(summary['failed'])} failed of {summary['planned']} ({summary['wall_time_s']:.0f} s)")
        for cell in summary["failed"]:
            print(f"failed: {cell} (log: {out}/cells/{cell}/log.txt); run the same command again to retry",
                  file=sys.stderr)
        if summary["failed"]:
            sys.exit(1)

    def table(self, out: str, section: str = "test") -> None:
        """Print the Table-1-style markdown table of the experiment folder OUT (mean +- std over seeds, x100).

        Args:
            out: the folder `experiment run` wrote.
            section: the evaluated datalist section: the test split or one of the experiment's extra_sections
                (e.g. real_tumours).
        """
        from due_ext.experiments.table import experiment_table

        print(experiment_table(out, section=section))

    def paired(self, out: str, reference: str = "baseline_plus", section: str = "test",
               against: str | None = None) -> None:
        """Print, per method, the seed-by-seed differences against REFERENCE on ROC-AUC, IoU, energy pointing
        and mask AUROC: mean [95 % bootstrap interval] (seeds above / seeds), x100.

        Args:
            out: the folder `experiment run` wrote.
            reference: the method every other is compared with (same seed, same training-set size).
            section: the test split or one of the experiment's extra_sections.
            against: another experiment folder: compare each method with the same method there instead (an
                experiment that changed one setting, e.g. the loss reading).
        """
        from due_ext.experiments.paired import experiment_paired_table

        try:
            print(experiment_paired_table(out, reference=reference, section=section, against=against))
        except ValueError as err:  # e.g. the reference method has no finished row
            print(f"error: {out}: {err}", file=sys.stderr)
            sys.exit(2)

    def figures(self, out: str, figures_dir: str | None = None) -> None:
        """Write the paper-style figures of the experiment folder OUT: metric vs training-set size (Fig. 3),
        Grad-CAM per method on the same test cases (Fig. 4), IoU/F1 vs threshold (Fig. 5), metric vs lambda
        (Fig. 6); each only when the results have what it shows.

        Args:
            out: the folder `experiment run` wrote.
            figures_dir: where the PNGs go (default OUT/figures).
        """
        from due_ext.experiments.figures import write_figures

        for path in write_figures(out, figures_dir):
            print(path)


class DueCLI:
    """DUE: dynamic uncertainty-aware explanation supervision for 3D medical images.

    Run `python -m due_ext GROUP COMMAND --help` for the help of a command.
    """

    def __init__(self) -> None:
        self.data = DataCommands()
        self.interp = InterpCommands()
        self.uncertainty = UncertaintyCommands()
        self.bundle = BundleCommands()
        self.experiment = ExperimentCommands()

    def demo(self, method: str = "due") -> None:
        """Run the main job on the embedded default data (what `make demo` runs).

        Trains the DUE bundle (bundles/due/train.json) on the lung-CT demo set, which is built into the
        cache on first use (the pyradiomics 3.0.1 sources are downloaded once) and completed with the
        shipped interpolator and uncertainty models; the training ends by evaluating the best model on the
        test split; prints the headline metrics and where the metrics and figures are.

        Args:
            method: explanation-supervision method (due, baseline, baseline_plus, gradia, haics, res_g, rrr, exbl).
        """
        import json
        from pathlib import Path

        from monai.bundle import run

        from due_ext.bundles import bundle_root

        root = Path(bundle_root("due"))
        run(config_file=str(root / "train.json"), method=method)  # ends with the test-split evaluation
        test_dir = root / "eval" / method / "test"
        metrics = json.loads((test_dir / "metrics.json").read_text())
        prediction, explanation = metrics["prediction"], metrics.get("explanation", {})
        print(f"\nDUE demo ({method}) on the lung-CT test split: ROC-AUC {prediction['roc_auc']:.3f}, "
              f"PR-AUC {prediction['pr_auc']:.3f}, explanation IoU "
              f"{explanation.get('iou', {}).get('mean', float('nan')):.3f}")
        print(f"metrics and figures: {test_dir}")

    def report(self, run_dir: str) -> None:
        """Regenerate metrics.json, metrics.csv and the figures of RUN_DIR from its evaluation.npz.

        Args:
            run_dir: folder of an evaluation run (written by the evaluate config).
        """
        from due_ext.report import write_report

        summary = write_report(run_dir)
        print(f"{run_dir}: report written (metrics.json, metrics.csv, figures) for {summary['n_items']} items, "
              f"{summary['n_explained']} explained positives")

    def backends(self) -> None:
        """Print which kernel backends (cpp, cuda, triton, reference) are available and why not."""
        from due_ext import backends

        for status in backends().values():
            print(status)


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m due_ext`` and the ``due-ext`` script."""
    try:
        fire.Fire(DueCLI(), command=argv, name="due_ext")
    except MissingExtraError as err:  # one line naming the extra to install, not a traceback
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
