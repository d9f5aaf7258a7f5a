"""Stage 1, float model -> quantised linears: api (awq_edge.quantize), cli (`quantize`, `eval`), the layer loop
(layerwise) and its methods (awq, gptq), calibration text, the float-model source and loader, perplexity."""
