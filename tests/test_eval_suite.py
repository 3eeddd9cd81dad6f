"""validate.py --suite imagenet: every set's class mapping, ReaL's rule, the table, and bad sets in one line.

The model's classifier has zero weights and a chosen bias, so its logits are the same known ranking for every
image whatever the image; each fake set puts its images in class folders picked from that ranking, so the right
mapping gives exact, hand-computed top-1 / top-5, and a wrong one (text-sorted V2 folders, R and A scored among all
1,000 logits) gives other numbers, which each test also checks.
"""
import json
import pkgutil
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
import yaml
from PIL import Image
from timm.data import ImageNetInfo, RealLabelsImagenet

from mnv_train import recipe as recipes
from mnv_train import resume
from mnv_train.cli import train_main, validate_main
from mnv_train.errors import UserError
from mnv_train.evaluation import chosen_weights
from mnv_train.pipeline import eval_size
from mnv_train.recipe import DataConfig

from conftest import ONE_EPOCH, REPO, TINY, merge

WNIDS = ImageNetInfo('imagenet-1k').label_names()


def timm_list(name: str) -> list[str]:
    return pkgutil.get_data('timm.data', f'_info/{name}').decode().split()


R_INDICES = [int(i) for i in timm_list('imagenet_r_indices.txt')]
A_INDICES = [int(i) for i in timm_list('imagenet_a_indices.txt')]
TEXT_LABEL = {int(name): i for i, name in enumerate(sorted(str(c) for c in range(1000)))}  # V2 sorted as text
# the model's five best classes: in neither R nor A, and moved by text sorting
TOP = [c for c in range(1000) if c not in R_INDICES and c not in A_INDICES and TEXT_LABEL[c] != c][:5]
R_ONLY = [c for c in R_INDICES if c not in A_INDICES and c not in TOP]
A_ONLY = [c for c in A_INDICES if c not in R_INDICES and c not in TOP]
R_TOP, A_TOP = R_ONLY[:5], A_ONLY[:5]  # the best of R's (A's) classes, below TOP among all 1,000
OTHER = [c for c in range(1000) if c not in TOP + R_TOP + A_TOP][100]


def bias() -> torch.Tensor:
    logits = torch.zeros(1000)
    for ranked, score in ((TOP, 10.0), (R_TOP, 5.0), (A_TOP, 3.0)):
        for j, c in enumerate(ranked):
            logits[c] = score - j / 10
    return logits


def image(path, seed: int):
    path.parent.mkdir(parents=True, exist_ok=True)
    noise = np.random.default_rng(seed).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path, quality=90)


def fill(folder, class_names: list[str], images: list[str]):
    """All of a set's class folders, and an image in the folder of each name in `images`."""
    for name in class_names:
        (folder / name).mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(images):
        image(folder / name / f'{i}.JPEG', i)


# V2: 4 images of the best class, one each of the next four, two of an unranked one -> 40 / 80
V2 = [TOP[0]] * 4 + TOP[1:] + [OTHER] * 2
SKETCH = [TOP[0]] * 3 + [TOP[1]] * 2 + [OTHER] * 5  # 30 / 50
R_SET = [R_TOP[0]] * 5 + [R_TOP[4]] * 2 + R_ONLY[5:8]  # among R's 200: 50 / 70
A_SET = [A_TOP[0]] * 2 + A_TOP[1:5] + A_ONLY[5:9]  # among A's 200: 20 / 60
# ReaL: 990 of the 1,000 validation images unlabelled; of the 10 labelled, 3 have the best class among several
# labels, 4 a label in the top 5 but not the top 1, 3 none of the top 5 -> 30 / 70
REAL = {0: [OTHER, TOP[0]], 1: [TOP[0]], 2: [TOP[0], TOP[2], OTHER], 3: [TOP[1]], 4: [TOP[2], OTHER], 5: [TOP[3]],
        6: [TOP[4]], 7: [OTHER], 8: [R_TOP[0]], 9: [A_TOP[0], OTHER]}


@pytest.fixture(scope='module')
def sets(tmp_path_factory):
    """A --data-root with every set, the constant-logit model as a plain weight file, and its recipe."""
    root = tmp_path_factory.mktemp('suite')
    data = root / 'data'
    fill(data / 'imagenetv2-matched-frequency', [str(c) for c in range(1000)], [str(c) for c in V2])
    fill(data / 'sketch', WNIDS, [WNIDS[c] for c in SKETCH])
    fill(data / 'imagenet-r', timm_list('imagenet_r_synsets.txt'), [WNIDS[c] for c in R_SET])
    fill(data / 'imagenet-a', timm_list('imagenet_a_synsets.txt'), [WNIDS[c] for c in A_SET])
    numbers = np.random.default_rng(0).permutation(1000) + 1  # file numbers in another order than the classes
    for c, wnid in enumerate(WNIDS):
        image(data / 'val' / wnid / f'ILSVRC2012_val_{numbers[c]:08d}.JPEG', c)
    real = [[] for _ in range(1000)]
    for c, labels in REAL.items():  # the image of class c carries these ReaL labels
        real[numbers[c] - 1] = labels
    (data / 'real.json').write_text(json.dumps(real))
    model = timm.create_model('mobilenetv4_conv_small', num_classes=1000)
    torch.nn.init.zeros_(model.get_classifier().weight)
    model.get_classifier().bias.data.copy_(bias())
    torch.save(model.state_dict(), root / 'constant.pth')
    recipe = root / 'tiny1k.yaml'
    recipe.write_text(yaml.safe_dump(merge(TINY, {'model': {'num_classes': 1000}})))
    return {'root': root, 'data': data, 'weights': root / 'constant.pth', 'recipe': recipe}


@pytest.fixture(scope='module')
def suite(sets):
    """validate.py --suite imagenet over every set: {set: its row}, and what it printed."""
    out = sets['root'] / 'suite.json'
    argv = [sets['weights'], '--recipe', sets['recipe'], '--suite', 'imagenet', '--data-root', sets['data'],
            '--json', out]
    assert validate_main(list(map(str, argv))) == 0
    result = json.loads(out.read_text())
    return {row['set']: row for row in result['sets']}, result


def test_imagenet_v2_folders_map_by_integer_name_not_text_order(suite):
    rows, _ = suite
    assert (rows['imagenet-v2']['images'], rows['imagenet-v2']['top1'], rows['imagenet-v2']['top5']) == (10, 40, 80)
    text_sorted_top1 = 100 * np.mean([TEXT_LABEL[c] == TOP[0] for c in V2])  # what timm's sorted folders would give
    assert text_sorted_top1 != 40


def test_sketch_maps_wnid_folders_to_imagenet_classes(suite):
    rows, _ = suite
    assert (rows['sketch']['images'], rows['sketch']['top1'], rows['sketch']['top5']) == (10, 30, 50)


def test_imagenet_r_and_a_score_among_their_own_200_classes(suite):
    rows, _ = suite
    assert (rows['imagenet-r']['images'], rows['imagenet-r']['top1'], rows['imagenet-r']['top5']) == (10, 50, 70)
    assert (rows['imagenet-a']['images'], rows['imagenet-a']['top1'], rows['imagenet-a']['top5']) == (10, 20, 60)
    unrestricted = bias().topk(5).indices.tolist()  # all 1,000 logits: the best five are outside R and A
    assert not set(unrestricted) & set(R_INDICES + A_INDICES)


def test_the_subset_indices_are_timms_own_lists():
    r_synsets, a_synsets = timm_list('imagenet_r_synsets.txt'), timm_list('imagenet_a_synsets.txt')
    assert [WNIDS[i] for i in R_INDICES] == r_synsets and [WNIDS[i] for i in A_INDICES] == a_synsets


def test_real_counts_multi_label_hits_and_skips_unlabelled_images_as_timm_does(suite, sets):
    rows, _ = suite
    assert (rows['real']['images'], rows['real']['top1'], rows['real']['top5']) == (10, 30, 70)
    filenames = sorted(str(p) for p in (sets['data'] / 'val').rglob('*.JPEG'))
    reference = RealLabelsImagenet(filenames, real_json=str(sets['data'] / 'real.json'))
    reference.add_result(bias().expand(len(filenames), -1))
    assert reference.get_accuracy() == pytest.approx({1: rows['real']['top1'], 5: rows['real']['top5']})


def test_the_suite_imagenet_row_equals_plain_validate_on_the_same_folder(suite, sets):
    rows, _ = suite
    out = sets['root'] / 'plain.json'
    argv = [sets['weights'], '--recipe', sets['recipe'], '--data-dir', sets['data'], '--set', 'data.dataset=folder',
            '--split', 'val', '--json', out]
    assert validate_main(list(map(str, argv))) == 0
    plain = json.loads(out.read_text())
    assert (rows['imagenet']['images'], rows['imagenet']['top1'], rows['imagenet']['top5']) == \
        (plain['count'], plain['top1'], plain['top5']) == (1000, 0.1, 0.5)
    assert all(row['gap_top1'] == pytest.approx(row['top1'] - 0.1) for row in rows.values())


def test_the_suite_scores_every_set_in_order_at_the_recipes_eval_size(suite):
    _, result = suite
    assert result['img_size'] == 32 and result['weights'] == 'raw'
    assert [row['set'] for row in result['sets']] == ['imagenet', 'imagenet-v2', 'sketch', 'imagenet-r',
                                                      'imagenet-a', 'real']


def test_missing_sets_are_listed_as_missing_and_sets_picks_some(sets, tmp_path, capsys):
    argv = [sets['weights'], '--recipe', sets['recipe'], '--suite', 'imagenet', '--data-root', tmp_path,
            '--sets', 'sketch', f'imagenet-v2={sets["data"] / "imagenetv2-matched-frequency"}', '--json',
            tmp_path / 'r.json']
    assert validate_main(list(map(str, argv))) == 0
    rows = json.loads((tmp_path / 'r.json').read_text())['sets']
    assert rows == [{'set': 'imagenet-v2', 'path': str(sets['data'] / 'imagenetv2-matched-frequency'), 'images': 10,
                     'top1': 40.0, 'top5': 80.0},
                    {'set': 'sketch', 'path': str(tmp_path / 'sketch'), 'missing': True}]
    printed = capsys.readouterr().out
    assert '| set | images | top-1 | top-5 | gap to ImageNet val |' in printed
    assert f'| sketch | missing ({tmp_path / "sketch"}) | | | |' in printed and '| imagenet-v2 | 10 | 40.00 | 80.00 |' \
        in printed


def suite_error(sets, capsys, *picks) -> str:
    argv = [sets['weights'], '--recipe', sets['recipe'], '--suite', 'imagenet', '--sets', *picks]
    assert validate_main(list(map(str, argv))) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    return error


def test_a_set_folder_with_the_wrong_number_of_classes_is_one_line_naming_the_set(sets, tmp_path, capsys):
    fill(tmp_path / 'sketch', WNIDS[:999], [WNIDS[0]])
    error = suite_error(sets, capsys, f'sketch={tmp_path / "sketch"}')
    assert error.startswith('error: sketch:') and 'holds 999 class folders, expected 1000' in error


def test_an_unknown_wnid_is_one_line_naming_the_set(sets, tmp_path, capsys):
    fill(tmp_path / 'r', timm_list('imagenet_r_synsets.txt')[:199] + ['n99999999'], [])
    error = suite_error(sets, capsys, f'imagenet-r={tmp_path / "r"}')
    assert error.startswith('error: imagenet-r:') and "'n99999999'" in error and 'imagenet_r_synsets.txt' in error


def test_a_real_json_of_the_wrong_length_is_one_line_naming_the_set(sets, tmp_path, capsys):
    (tmp_path / 'real.json').write_text(json.dumps([[1]] * 999))
    error = suite_error(sets, capsys, f'imagenet={sets["data"] / "val"}', f'real={tmp_path / "real.json"}')
    assert error.startswith('error: real:') and 'labels for 999 images, val/ holds 1000' in error


def test_an_unknown_set_name_suggests_the_closest(sets, capsys):
    assert "unknown set 'skecth' (did you mean 'sketch'?)" in suite_error(sets, capsys, 'skecth=x')


def test_a_model_with_other_than_1000_classes_is_refused(sets, tmp_path, capsys):
    torch.save(timm.create_model('mobilenetv4_conv_small', num_classes=10).state_dict(), tmp_path / 'ten.pth')
    recipe = tmp_path / 'ten.yaml'
    recipe.write_text(yaml.safe_dump(merge(TINY, {'model': {'num_classes': 10}})))
    argv = [tmp_path / 'ten.pth', '--recipe', recipe, '--suite', 'imagenet', '--data-root', sets['data']]
    assert validate_main(list(map(str, argv))) == 2
    assert 'has 10 outputs, not 1000' in capsys.readouterr().err


def test_training_with_eval_suite_scores_the_final_weights_into_the_report(sets, tmp_path):
    partial = tmp_path / 'partial'
    partial.mkdir()
    (partial / 'sketch').symlink_to(sets['data'] / 'sketch')
    recipe = tmp_path / 'r.yaml'
    recipe.write_text(yaml.safe_dump(merge(TINY, merge(ONE_EPOCH, {'model': {'num_classes': 1000},
                                                                    'train': {'eval_suite': 'imagenet'}}))))
    assert train_main(['--recipe', str(recipe), '--output', str(tmp_path / 'run'), '--data-root', str(partial),
                       '--quiet']) == 0
    result = json.loads((tmp_path / 'run' / 'checkpoints' / 'last.suite-ema-32-1.json').read_text())
    assert {row['set']: 'missing' in row for row in result['sets']} == {
        'imagenet': True, 'imagenet-v2': True, 'sketch': False, 'imagenet-r': True, 'imagenet-a': True, 'real': True}
    report = (tmp_path / 'run' / 'report.md').read_text()
    assert '## Evaluation suite: last.pt, ema weights, 32 px, crop 1' in report and '| sketch | 10 |' in report
    best = tmp_path / 'run' / 'checkpoints' / 'best.pt'
    assert validate_main([str(best), '--weights', 'raw', '--suite', 'imagenet', '--data-root', str(partial)]) == 0
    assert (best.parent / 'best.suite-raw-32-1.json').is_file()
    report = (tmp_path / 'run' / 'report.md').read_text()
    assert '## Evaluation suite: best.pt, raw weights, 32 px, crop 1' in report and 'last.pt, ema' in report


def test_train_refuses_eval_suite_without_data_root(write_recipe, capsys):
    recipe = write_recipe({'train': {'eval_suite': 'imagenet'}})
    assert train_main(['--recipe', str(recipe), '--print-recipe']) == 2
    assert 'train.eval_suite is imagenet: pass --data-root' in capsys.readouterr().err


def test_results_land_beside_the_checkpoint_named_by_weights_size_crop_and_recalibration(sets, tmp_path):
    weights = tmp_path / 'constant.pth'
    weights.write_bytes(sets['weights'].read_bytes())
    argv = [weights, '--recipe', sets['recipe'], '--suite', 'imagenet', '--precise-bn', '1', '--sets',
            f'imagenet-v2={sets["data"] / "imagenetv2-matched-frequency"}']
    assert validate_main(list(map(str, argv))) == 0
    result = json.loads((tmp_path / 'constant.suite-raw-32-1-pbn1.json').read_text())
    assert result['precise_bn_batches'] == 1 and result['sets'][0]['top1'] == 40


def test_sets_scored_one_at_a_time_add_up_for_the_same_weights_and_a_suite_that_finds_none_writes_nothing(
        sets, tmp_path, capsys):
    weights, data = tmp_path / 'constant.pth', sets['data']
    weights.write_bytes(sets['weights'].read_bytes())
    result = weights.with_name('constant.suite-raw-32-1.json')

    def scored(*picks) -> dict:
        argv = [weights, '--recipe', sets['recipe'], '--suite', 'imagenet', '--sets', *picks]
        assert validate_main(list(map(str, argv))) == 0, capsys.readouterr().err
        return {row['set']: row.get('top1') for row in json.loads(result.read_text())['sets']}

    assert scored(f'imagenet-v2={data / "imagenetv2-matched-frequency"}') == {'imagenet-v2': 40.0}
    assert scored(f'sketch={data / "sketch"}') == {'imagenet-v2': 40.0, 'sketch': 30.0}
    assert '(kept from an earlier evaluation of the same weights in constant.suite-raw-32-1.json: imagenet-v2)' in \
        capsys.readouterr().out
    before = result.read_bytes()
    for picks, said in ((['--sets', f'sketch={tmp_path / "nowhere"}'], f'--sets sketch={tmp_path / "nowhere"}: '
                         f'{tmp_path / "nowhere"} does not exist'),
                        (['--data-root', tmp_path / 'nowhere'], '--suite: none of its sets is there')):
        argv = [weights, '--recipe', sets['recipe'], '--suite', 'imagenet', *picks]
        assert validate_main(list(map(str, argv))) == 2
        error = capsys.readouterr().err
        assert error.startswith(f'error: {said}') and error.count('\n') == 1
    assert result.read_bytes() == before  # what was scored before is not lost

    model = timm.create_model('mobilenetv4_conv_small', num_classes=1000)
    torch.nn.init.zeros_(model.get_classifier().weight)
    model.get_classifier().bias.data.copy_(bias().flip(0))  # other weights in the same file: nothing carries over
    torch.save(model.state_dict(), weights)
    assert set(scored(f'sketch={data / "sketch"}')) == {'sketch'}


def test_two_processes_score_every_set_as_one_does(sets, suite, tmp_path):
    """Each rank scores its share of the images; ReaL's labels must follow the share, not the file order."""
    out = tmp_path / 'two.json'
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
               REPO / 'validate.py', sets['weights'], '--recipe', sets['recipe'], '--device', 'cpu', '--suite',
               'imagenet', '--data-root', sets['data'], '--sets', 'real', 'imagenet-r', '--json', out]
    result = subprocess.run(list(map(str, command)), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    rows, _ = suite
    assert json.loads(out.read_text())['sets'] == [rows['imagenet'], rows['imagenet-r'], rows['real']]


def test_adding_the_suite_on_resume_is_reported_not_refused():
    saved = recipes.from_dict(TINY).to_dict()
    changed = recipes.from_dict(merge(TINY, {'train': {'eval_suite': 'imagenet'}})).to_dict()
    assert resume.recipe_changes(saved, changed) == [('train.eval_suite', 'none', 'imagenet', True)]


def test_changing_the_evaluation_cadence_on_resume_is_reported_not_refused():
    saved = recipes.from_dict(TINY).to_dict()
    cadence = merge(saved, {'train': {'extra_eval_every': 10, 'fit_check_every': 10},
                            'data': {'eval_persistent_workers': True}})
    assert all(observes for *_, observes in resume.recipe_changes(saved, cadence))  # evaluation only: not refused
    assert len(resume.recipe_changes(saved, cadence)) == 3


def test_a_checkpoint_and_a_finished_run_choose_ema_or_raw_weights_by_one_rule(tmp_path):
    recipe, raw, ema, path = recipes.from_dict(TINY), {'w': torch.zeros(1)}, {'w': torch.ones(1)}, tmp_path / 'last.pt'
    picked = {(choice, has_ema): chosen_weights(recipe, raw, ema if has_ema else None, path, None, choice)
              for choice in ('auto', 'raw', 'ema') for has_ema in (True, False) if (choice, has_ema) != ('ema', False)}
    assert {key: (w.kind, w.state_dict is ema) for key, w in picked.items()} == {
        ('auto', True): ('ema', True), ('auto', False): ('raw', False), ('raw', True): ('raw', False),
        ('raw', False): ('raw', False), ('ema', True): ('ema', True)}
    with pytest.raises(UserError, match=f'checkpoint {path} holds no EMA weights'):
        chosen_weights(recipe, raw, None, path, None, 'ema')


def test_every_main_evaluation_is_at_data_eval_img_size_or_else_the_training_size():
    assert eval_size(DataConfig(img_size=32)) == 32 and eval_size(DataConfig(img_size=32, eval_img_size=40)) == 40
