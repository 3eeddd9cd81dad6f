"""The package's structure: layers without import cycles, and a wheel that carries every recipe."""
import ast
import runpy
import subprocess
import sys
import zipfile
from pathlib import Path

from mnv_train import recipe as recipes

from conftest import REPO

# the only imports allowed inside a function (nvidia: DALI)
OPTIONAL_HEAVY = {'matplotlib', 'onnxruntime', 'wandb', 'mlflow', 'nvidia', 'streaming'}


def test_the_import_graph_has_no_cycle_and_no_package_import_inside_a_function():
    result = subprocess.run([sys.executable, str(REPO / 'tools' / 'import_graph.py')], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout
    assert 'CYCLE' not in result.stdout and 'FUNCTION-LEVEL IMPORT' not in result.stdout
    graph = runpy.run_path(str(REPO / 'tools' / 'import_graph.py'))
    floors = graph['floors'](graph['read_graph']()[0])
    assert floors['errors'] < floors['checkpoint'] < floors['build'] < floors['engine'] < floors['dryrun']
    assert floors['dryrun'] < floors['cli']
    assert floors['resume'] < floors['build'] and floors['evaluation'] < floors['engine']


def test_functions_import_only_optional_heavy_dependencies():
    for path in sorted((REPO / 'mnv_train').glob('*.py')):
        tree = ast.parse(path.read_text())
        for function in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)):
            for node in ast.walk(function):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    names = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                    assert {n.split('.')[0] for n in names} <= OPTIONAL_HEAVY, f'{path.name}:{node.lineno}'


def test_the_wheel_ships_every_recipe_and_the_console_scripts(tmp_path):
    result = subprocess.run([sys.executable, '-m', 'pip', 'wheel', str(REPO), '--no-deps', '--no-build-isolation',
                             '-w', str(tmp_path), '-q'], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    [wheel] = tmp_path.glob('mnv_train-*.whl')
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {p.relative_to(recipes.RECIPES_DIR.parent.parent).as_posix() for p in recipes.RECIPES_DIR.rglob('*.yaml')}
    assert len(shipped) >= 20 and shipped <= names
    entry_points = next(n for n in names if n.endswith('entry_points.txt'))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert 'mnv-train = mnv_train.cli:train_main' in text and 'mnv-validate = mnv_train.cli:validate_main' in text
    assert not any(Path(n).parts[0] == 'tests' for n in names)
