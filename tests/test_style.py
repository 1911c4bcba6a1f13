"""What this proves about the repository as a whole (run: python -m pytest tests/test_style.py):
- every Python file, tests included, keeps its lines within 100 characters;
- every command that a README, a module docstring or runs/study.sh documents (`python X.py
  [subcommand]`, `python -m runs.X [subcommand]`) exists and answers `--help` with exit 0, so
  that moving a file cannot leave a stale command behind.
"""
import contextlib
import glob
import io
import os
import re
import runpy
import sys

import pytest

from conftest import ROOT

LIMIT = 100


def python_files():
    return sorted(
        glob.glob(os.path.join(ROOT, '*.py')) + glob.glob(os.path.join(ROOT, '*', '*.py'))
    )


def test_every_line_within_100_characters():
    long = []
    for path in python_files():
        with open(path, encoding='utf-8') as f:
            long += [f'{os.path.relpath(path, ROOT)}:{i}' for i, line in enumerate(f, 1)
                     if len(line.rstrip('\n')) > LIMIT]
    assert not long, f'{len(long)} lines over {LIMIT} characters: {long[:20]}'


# `python train.py`, `python bench.py loss`, `python -m runs.report sweep`, ...
COMMAND = re.compile(r'python3? (-m (?!pytest)[\w.]+|[\w/]+\.py)(?: ([a-z_]+))?')


def documented_commands():
    """(module or script, the word after it) for every command the documentation shows."""
    texts = [os.path.join(ROOT, 'README.md'), os.path.join(ROOT, 'runs', 'README.md'),
             os.path.join(ROOT, 'runs', 'study.sh'),
             *[path for path in python_files() if path != os.path.abspath(__file__)]]
    found = set()
    for path in texts:
        with open(path, encoding='utf-8') as f:
            found |= set(COMMAND.findall(f.read()))
    return sorted(found)


def run_help(target, *words):
    """`python TARGET WORDS --help` run in this process (runpy, as `python` would run it, but
    without starting an interpreter and importing torch again): (exit code, what it printed)."""
    argv, out = sys.argv, io.StringIO()
    sys.argv = [target, *words, '--help']
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            if target.startswith('-m'):
                runpy.run_module(target.split()[1], run_name='__main__', alter_sys=True)
            else:
                runpy.run_path(os.path.join(ROOT, target), run_name='__main__')
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except (ImportError, OSError) as e:   # no such module or file
        code, _ = 1, out.write(str(e))
    finally:
        sys.argv = argv
    return code, out.getvalue()


def test_documented_commands_answer_help():
    commands = documented_commands()
    assert ('train.py', '') in commands and ('-m runs.report', 'ablation') in commands
    helped = {}
    for target, word in commands:
        if target not in helped:
            code, printed = run_help(target)
            assert code == 0, f'python {target} --help: {printed[-500:]}'
            helped[target] = printed
        # the word after the command is a subcommand where the command lists it as one
        subcommands = re.search(r'\{([\w,]+)\}', helped[target])
        if word and subcommands and word in subcommands.group(1).split(','):
            code, printed = run_help(target, word)
            assert code == 0, f'python {target} {word} --help: {printed[-500:]}'


@pytest.mark.parametrize('missing', ['python -m runs.nothing', 'python nothing.py'])
def test_a_stale_command_would_be_caught(missing):
    (target, _), = COMMAND.findall(missing)
    assert run_help(target)[0] != 0
