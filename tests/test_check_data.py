import io
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from timm.data.readers.reader_image_folder import find_images_and_targets

from mnv_train import check_data
from mnv_train.data import open_image
from mnv_train.errors import UserError


def _image(size=(64, 48), seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def _jpeg_bytes(seed=0) -> bytes:
    buffer = io.BytesIO()
    _image(seed=seed).save(buffer, 'JPEG', quality=90)
    return buffer.getvalue()


@pytest.fixture
def dataset(tmp_path):
    """DATA/train/<class>/ and DATA/validation/<class>/ with five good images, three bad ones and a text file."""
    root = tmp_path / 'data'
    for folder in ('train/cat', 'train/dog', 'validation/cat'):
        (root / folder).mkdir(parents=True)
    _image(seed=1).save(root / 'train/cat/a.jpg', 'JPEG')
    _image(seed=2).save(root / 'train/cat/b.png', 'PNG')
    _image(seed=3).save(root / 'train/dog/c.jpeg', 'JPEG')
    _image(seed=4).save(root / 'validation/cat/d.JPEG', 'JPEG')
    _image(seed=5).convert('L').save(root / 'validation/cat/e.png', 'PNG')
    whole = _jpeg_bytes(seed=6)
    bad = {'truncated': root / 'train/dog/truncated.jpg', 'text': root / 'train/cat/text.jpg',
           'empty': root / 'validation/cat/empty.jpg'}
    bad['truncated'].write_bytes(whole[:len(whole) // 2])
    bad['text'].write_text('not an image, only named like one\n')
    bad['empty'].write_bytes(b'')
    (root / 'train/cat/notes.txt').write_text('never read by training\n')
    return root, bad


def _listed(path) -> dict:
    return dict(line.split('\t') for line in path.read_text().splitlines())


def test_unreadable_files_are_listed_with_the_reason_training_would_give_and_exit_1(dataset, tmp_path, capsys):
    root, bad = dataset
    out = tmp_path / 'unreadable.txt'
    assert check_data.main([str(root), '--workers', '1', '--output', str(out)]) == 1
    listed = _listed(out)
    assert set(listed) == {str(p) for p in bad.values()}
    for path in bad.values():
        with pytest.raises(UserError) as raised:
            open_image(path, str(path))
        assert str(raised.value) == f'cannot read image {path}: {listed[str(path)]}'
    assert 'truncated' in listed[str(bad['truncated'])]
    captured = capsys.readouterr()
    assert re.fullmatch(rf'checked 8 images in \d+\.\d s: 3 unreadable, listed in {re.escape(str(out))}\n',
                        captured.out)
    assert 'note: 1 file(s)' in captured.err


def test_one_and_two_workers_list_the_same_files_in_the_same_order(dataset, tmp_path):
    root, _ = dataset
    outputs = [tmp_path / 'one.txt', tmp_path / 'two.txt']
    assert check_data.main([str(root), '--workers', '1', '--output', str(outputs[0])]) == 1
    assert check_data.main([str(root), '--workers', '2', '--output', str(outputs[1])]) == 1
    assert outputs[0].read_text() == outputs[1].read_text() != ''


def test_every_file_timms_folder_reader_loads_is_checked_and_other_suffixes_are_counted(dataset):
    root, _ = dataset
    images, others = check_data.find_images(root)
    for folder in (root, root / 'train', root / 'validation'):
        loaded = {path for path, _ in find_images_and_targets(str(folder))[0]}
        assert loaded <= {str(p) for p in images}
    assert len(images) == 8 and others == 1


def test_a_clean_folder_exits_0_and_leaves_an_empty_list(tmp_path, capsys):
    (tmp_path / 'data/cat').mkdir(parents=True)
    _image().save(tmp_path / 'data/cat/a.jpg', 'JPEG')
    out = tmp_path / 'unreadable.txt'
    out.write_text('stale line from an earlier run\n')
    assert check_data.main([str(tmp_path / 'data'), '--output', str(out)]) == 0
    assert out.read_text() == ''
    assert ': 0 unreadable, listed in ' in capsys.readouterr().out


@pytest.mark.parametrize('case', ['empty folder', 'output inside the data folder', 'output folder missing'])
def test_usage_mistakes_are_one_line_and_exit_2(tmp_path, capsys, case):
    root = tmp_path / 'data'
    (root / 'cat').mkdir(parents=True)
    out = tmp_path / 'unreadable.txt'
    if case != 'empty folder':
        _image().save(root / 'cat/a.jpg', 'JPEG')
        out = root / 'unreadable.txt' if case == 'output inside the data folder' else tmp_path / 'no/such/out.txt'
    assert check_data.main([str(root), '--output', str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and len(err.splitlines()) == 1
    assert not (root / 'unreadable.txt').exists()


def test_a_missing_folder_exits_2_with_one_line_and_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, '-m', 'mnv_train.check_data', str(tmp_path / 'missing'),
                             '--output', str(tmp_path / 'unreadable.txt')], cwd=Path(__file__).resolve().parents[1],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.startswith('error: ') and len(result.stderr.splitlines()) == 1, result.stderr
    assert 'missing' in result.stderr and result.stdout == ''
