"""Tools that analyse ltjax's kernels without timing them (no GPU needed): each runs as
``python -m benchmarks.analysis.<name>``.

- `cuda_sass`: registers and per-element instruction counts of the CUDA small-M kernels, from their SASS;
- `triton_ir`: the Triton IR of every Pallas kernel (or sweep candidate), for the offline compile check;
- `occupancy`: programs per SM of each kernel, from that check's registers and grid.

Their outputs go to a dated folder of ``benchmarks/results/`` as the benchmarks' do.
"""
