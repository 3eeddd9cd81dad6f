#!/usr/bin/env bash
# One line naming this machine's CPU for timings: lscpu's model name, family/model (which tell Zen 3 from Zen 4
# or 5 where the name is only "AMD EPYC"), and whether it has AVX-512, which roughly triples CPU training speed.
model=$(lscpu | sed -n 's/^Model name: *//p')
family=$(lscpu | sed -n 's/^CPU family: *//p')
number=$(lscpu | sed -n 's/^Model: *//p')
if grep -qw avx512f /proc/cpuinfo; then simd=AVX-512; else simd='AVX2, no AVX-512'; fi
echo "$model (family $family, model $number, $simd)"
