"""The package's commands, one module each, above the library they use (no library module
imports from here).

Hydra commands: `train`, `evaluate`, `evaluate_pose`, `predict`, `export`, `export_gt` (config
files in the package's `conf/`); argparse commands: `import_reference`, `export_reference`,
`pseudolabel`, `report`. Every command has `main(argv=None) -> int`, returning its exit status,
and reports a user mistake as one line ``fsre_lightning.<command>: error: <message>`` with
status 2 (`fsre_lightning.runtime`). Each is a console script (`fsre-train`,
`fsre-export-reference`, ...; pyproject.toml) and runs as `python -m fsre_lightning.<command>`
through thin modules at the package's top.
"""

COMMANDS = ("train", "evaluate", "evaluate_pose", "predict", "export", "export_gt",
            "import_reference", "export_reference", "pseudolabel", "report")
