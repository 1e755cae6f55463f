"""The dataset-size sweep's presets, and the measurements each setting rests on.

`experiments.sweep_n` reads them; a preset's `per_dataset` overrides the sweep's
settings for one dataset (a dict: one arm) or gives it several arms (a list of
dicts), each with its own η, hold and step cap. Arms are told apart by their model;
two arms of one model (e.g. resnet with norm=none and norm=batch) give the second an
`arm` name of its own (`lossland.scaling.arm_name`), which names its runs and groups.
"""

# Defaults of every preset; a preset's `per_dataset` overrides them for one dataset's arm.
SWEEP_DEFAULTS = dict(model="mlp", activations=["relu", "tanh"], losses=["mse"], chunk_size=4096,
                      probe_s_max_steps=0.0, probe_s_max_theta=0.0, probe_from_eos=False,
                      per_dataset={})

PRESETS = {
    # For tests: small and fast (2–3 min on 2 shared CPU cores), two datasets, every run
    # entering the edge of stability (lossland.eos) and holding it for 100 steps. Measured
    # 2026-12-06 on the shared 2-core CPU; "a/b" counts runs at the edge of stability (held
    # 100 steps) over 3 sizes × the seeds named.
    # * MNIST-1D, MLP 1×16, N = 64–128 (at N = 256 the ratio was still 0.72–0.78 at step 150
    #   and at N = 32 the ReLU runs diverged at step 7, 2026-12-04). Every run starts above
    #   2/η, GD catapults, and λ1·η/2 falls below 0.9 (by step 15) before it sharpens back. The
    #   earlier setting, η = 0.5 with hold_steps 10, had tanh 4/6 (seeds 0, 1): tanh sharpens
    #   straight through the band (0.9 → 1.16 in ~70 steps), so a short hold is met while it
    #   crosses and the final tracked row lands above it; settled, its trailing median sits at
    #   1.05–1.09, on the band's upper edge. η = 0.5, hold 100: relu 6/6, tanh 5/6 (seeds 0,
    #   1), and relu 14/18 (seeds 0–5: seed 2 diverges at every N, λ1·η/2 = 3.3–4.2 at
    #   initialization). η = 0.4, hold 100: tanh 5/6. η = 0.3: a tanh run never fell below
    #   0.9 (min 0.902), so it never entered. η = 0.35, hold 100: 12/12 on seeds 0, 1 (entry
    #   at steps 20–235, stopped by step 355, median ratio while holding 0.94–1.07), but the
    #   tanh catapult lands just under 0.9 (minima 0.8996 and 0.896 for two of them), and on
    #   seeds 2–5 relu 11/12, tanh 7/12: each run that failed was at the edge (median ratio
    #   over its second half 1.03–1.07) but never fell below 0.9 first (minima 0.91–0.99), and
    #   the entry rule requires that. MNIST-1D tanh at these sizes has no η with margin on
    #   both sides; deeper (2×16, η = 0.35) helps tanh (6/6, minima 0.72–0.84) but not relu
    #   (5/6).
    # * Fashion-MNIST needs its own arm: MLP 1×16 at N = 128 and CNN 1×4 did not sharpen to
    #   2/η within 200 steps (2026-12-04: λ1·η/2 fell, e.g. 0.71 → 0.47), nor did MLP 2×32 at
    #   N = 512–2048 started below 0.9 (η = 0.005–0.02: λ1 fell from 69–75 to 26–38, then
    #   regained at most 17% in 1200 steps). MLP 4×32 sharpens faster: λ1 falls from 25–29 at
    #   initialization to 12–15, then climbs. Started below 0.9 (η = 0.06, N = 512) it entered
    #   at steps 300 and 695, too slow here. Started above (ratio 1.1–1.6, falling to 0.52–0.86
    #   within 25 steps, then sharpening back), hold 100, N = 256, 512, 1024: η = 0.10: 5/6
    #   (at N = 1024 the ratio hovers at 0.91–0.93); η = 0.12: 6/6, the last stopped at step
    #   405; η = 0.11: 6/6 on seeds 0, 1 (entry at steps 20–90, stopped by step 325, median
    #   ratio while holding 0.94–1.06) and 11/12 on seeds 2–5 (N = 256, seed 2 never fell
    #   below 0.9: minimum 0.915). ReLU only, as in the full preset's arm: the tanh MLP 4×32
    #   has λ1 ≈ 90 at initialization and would need its own η.
    # (The Gaussian mixture did not sharpen either: MLP 1×16, η = 0.5 and 1.0: 0.64 and 0.84
    # at step 200.)
    "smoke": dict(dataset=["mnist1d", "fashion_mnist"], n_values=[64, 96, 128], seeds=[0, 1],
                  width=16, depth=1, lr=0.35, max_steps=500, hold_steps=100, track_every=5,
                  probe_every=20, track_k=1, lanczos_iters=8, probe_points=9,
                  num_random_directions=1, probe_s_max=0.05, num_bootstrap=500,
                  per_dataset={"fashion_mnist": dict(n_values=[256, 512, 1024], width=32,
                                                     depth=4, lr=0.11,
                                                     activations=["relu"])}),
    # ≤ 60 min on 2 CPU cores with the rest of `make reproduce`: MNIST-1D, MLP 2×256, GD
    # η = 0.05, MSE (MISSION defaults), and a Fashion-MNIST CNN. Runs stop once they have
    # held the edge of stability `hold_steps`, so the cap only binds for runs that never get
    # there, and those are counted, not fitted.
    # * MNIST-1D, N = 500–2000. Measured 2026-12-06 (commit 0afe5f7, seeds 0–2): every run
    #   at N = 500, 1000, 2000 held (stopped at steps 850–3400, 9–57 s each); at N = 4000
    #   only 1 of 6 held within 4000 steps (the other five cost 107–124 s each, 11 min of
    #   the sweep's 19), so N = 4000 is left to the full preset. N = 250 never gets there
    #   (2026-11-27: λ1 plateaus near 29 < 0.9·2/η = 36). η = 0.1 is no shortcut: the ReLU
    #   MLP catapults from λ1·η/2 = 3.1 to 0.07 and was at 0.39–0.44 after 1000 steps.
    # * Fashion-MNIST arm: the CNN with 2 conv blocks of 8 channels, η = 0.1, N = 500–2000.
    #   Measured 2026-12-06 (seed 0): at N = 500 λ1·η/2 starts at 1.12, falls to 0.39 by
    #   step 10, sharpens back through 0.9 at step 85 and holds 0.96–1.16 (seeds 0–2 held,
    #   stopped at steps 220–280); η = 0.2 overshoots (1.0–1.7 for 500 steps). 8 channels
    #   because XLA's CPU convolutions are slow: 16 channels cost 4× per tracked step. Chunks
    #   of 500: at N = 2000 a Lanczos step of 8 products took 15–23 s unchunked, 5.3–6.4 s in
    #   chunks of 500 (BUILD_NOTES); chunks of 250 made N = 500 runs 85–111 s each.
    # With these settings (2026-12-06, commit 62b339f): 27 of 27 runs held; the sweep took
    # 42.5 min (the CNN 33 of them: 73–91 s per run at N = 500, 185–228 s at 1000, 347–404 s
    # at 2000) and all of `make reproduce` 53.7 min (docs/results/2026-12-06-quick-cpu).
    "quick": dict(dataset=["mnist1d", "fashion_mnist"], n_values=[500, 1000, 2000],
                  seeds=[0, 1, 2], width=256, depth=2, lr=0.05, max_steps=4000, hold_steps=200,
                  track_every=50, probe_every=500, track_k=1, lanczos_iters=12, probe_points=21,
                  num_random_directions=1, probe_s_max=0.05, num_bootstrap=2000,
                  per_dataset={"fashion_mnist": dict(model="cnn", width=8, depth=2, lr=0.1,
                                                     activations=["relu"],
                                                     n_values=[500, 1000, 2000],
                                                     max_steps=1000, hold_steps=100,
                                                     track_every=20, lanczos_iters=8,
                                                     chunk_size=500)}),
    # Two decades of N on 2 CPU cores (issue 25): MNIST-1D and the teacher (any N), N =
    # 256 … 16384 (64×, 7 sizes), ReLU and tanh, 3 seeds; one arm per setting whose every run
    # enters and holds the edge of stability, and η-scan arms for C2's η scaling. MLP 2×64
    # throughout: small enough that N = 16384 costs ~1–2 min a run. Calibration, seed 0
    # unless said, 2026-12-06/07, on the 2-core CPU shared with three developers (load 6–8:
    # times are upper bounds); "entry" is the EoS entry step (lossland.eos):
    # * MNIST-1D, η = 0.1: relu entry 550 / 2150 / 9450 / 12800 at N = 256 / 1024 / 4096 /
    #   16384; tanh 900 / 4750 / 12800 and still at λ1·η/2 = 0.65 at step 10256 for N =
    #   16384 — too slow. η = 0.2: relu 500 / 1900 / 3450 at N = 256 / 4096 / 16384 (λ1·η/2
    #   1.9 at init, a catapult to 0.25–0.39, sharpening back); tanh 100 / 750 / 850 (1.36 at
    #   init, down to 0.58–0.87: at N = 256 the catapult barely dips under 0.9).
    #   Seeds 1, 2 at N = 256, tanh: entry 100, minima 0.86 and 0.84. η = 0.3 is too much
    #   for tanh: at N = 256 its catapult bottoms at 0.97, so it never enters (it sits at
    #   λ1·η/2 = 1.00 from above while the loss goes to 1e-9).
    # * teacher, η = 0.1: relu entry 15650 at N = 1024; tanh never (λ1·η/2 0.54 at step
    #   20000). η = 0.2, N = 4096: relu 6800, tanh 5550. Hence an arm per activation: relu
    #   at η = 0.3 (entry 700 / 3550 at N = 256 / 4096; 2.5 at init, catapult to 0.34–0.37)
    #   and tanh at η = 0.5 (entry 200 / 300 at N = 1024 / 4096; 1.2–1.3 at init, down to
    #   0.76–0.78): the tanh teacher network's sharpness is ~4× lower.
    # * η scan, MNIST-1D ReLU, N = 1024: entry 9500 at η = 0.05, 2150 at 0.1, 550 at 0.3
    #   (λ1·η/2 = 2.83 at init, a catapult to 0.30, no divergence).
    "decade": dict(dataset=["mnist1d", "teacher"],
                   n_values=[256, 512, 1024, 2048, 4096, 8192, 16384], seeds=[0, 1, 2],
                   width=64, depth=2, lr=0.2, max_steps=12000, hold_steps=500, track_every=25,
                   probe_every=100, probe_from_eos=True, track_k=1, lanczos_iters=12,
                   probe_points=33, num_random_directions=1, probe_s_max=0.05,
                   probe_s_max_steps=16.0, probe_s_max_theta=0.005, num_bootstrap=2000,
                   chunk_size=4096,
                   cost_note="per-run times measured on the shared 2-core CPU, load 6–8",
                   per_dataset={
                       "mnist1d": [
                           dict(arm="mlp", lr=0.2,
                                measured_seconds={256: 27, 4096: 34, 16384: 133}),
                           # η scan at N = 1024 (ReLU), with the main arm's η = 0.2.
                           dict(arm="mlp_lr0.05", lr=0.05, n_values=[1024],
                                activations=["relu"], max_steps=16000, role="eta_scan",
                                measured_seconds={1024: 56}),
                           dict(arm="mlp_lr0.1", lr=0.1, n_values=[1024], activations=["relu"],
                                role="eta_scan", measured_seconds={1024: 24}),
                           dict(arm="mlp_lr0.3", lr=0.3, n_values=[1024], activations=["relu"],
                                role="eta_scan", measured_seconds={1024: 40})],
                       "teacher": [
                           # N = 1024–65536, not 256–16384: in seeds 0–8 the gradient
                           # excess peaked at N = 2048 (per-N means 1.54, 1.83, 2.20,
                           # 2.43, 1.51, 1.25, 1.07 at N = 256 … 16384), where the
                           # network stops fitting the teacher (train accuracy 0.999 at
                           # N = 256, 0.978 at 2048, 0.845 at 16384); a power law across
                           # the hump cannot have a narrow interval (seeds 6–8: half-width
                           # 0.23). MNIST-1D ReLU peaks the same way at N = 512 (accuracy
                           # 0.998), the first sizes of its range. Moved, and the cap
                           # raised for N = 65536, before seeds 9–11 ran; rules unchanged.
                           dict(arm="mlp_relu", lr=0.3, activations=["relu"],
                                n_values=[1024, 2048, 4096, 8192, 16384, 32768, 65536],
                                max_steps=16000,
                                measured_seconds={1024: 28, 4096: 45, 8192: 146,
                                                  16384: 160}),
                           # N = 512–32768, not 256: at N = 256 three of six seeds
                           # (2 of the first decade run; 3 and 5 of its confirmatory run,
                           # 2026-12-07) never entered the edge of stability at η = 0.5
                           # within 12000 steps, so N = 256 had one seed at the edge and
                           # the seed bootstrap no interval. Moved before seeds 6–8 ran.
                           dict(arm="mlp_tanh", lr=0.5, activations=["tanh"],
                                n_values=[512, 1024, 2048, 4096, 8192, 16384, 32768],
                                measured_seconds={1024: 20, 4096: 27, 16384: 44})]}),
    # The cross-entropy control of the decade sweep (issue 25), MNIST-1D ReLU, MLP 2×64,
    # η = 0.2. Under cross-entropy λ1 rises to 2/η and then falls as the loss goes to 0, so
    # the edge of stability is a window, and the hold must fit inside it. Measured (seed 0,
    # no probes, load 6–8): N = 1024: λ1·η/2 0.25 at init, entry at step 150, inside
    # [0.9, 1.1] until ~650 (loss 1.15 → 0.14), 0.55 by step 1000, 0.01 by 20000: a window
    # of ~500 steps. N = 16384: entry 250, held 500 steps by step 950 (loss 0.83). Hold
    # 150 steps (the trailing median spans 125), track every 25; the cap stops a run whose
    # window closed before its hold was met (counted, not fitted).
    # First decade run (2026-12-07, N = 256–16384, docs/results/2026-12-07-decade-cpu/
    # sweep_ce_first_*): 15 of 21 runs held; at N = 256 and 512 none did: λ1·η/2 peaked at
    # 0.71–1.02 near steps 100–200 and fell as the loss went to 0, before any run held the
    # band for 150 steps. Small N has no edge-of-stability window under cross-entropy at
    # this η, so the arm now spans N = 1024–65536 (64×, 7 sizes), where it had one; the C1
    # and C2 rules are unchanged.
    "decade_ce": dict(dataset=["mnist1d"], losses=["cross_entropy"], activations=["relu"],
                      n_values=[1024, 2048, 4096, 8192, 16384, 32768, 65536], seeds=[0, 1, 2],
                      width=64, depth=2, lr=0.2, max_steps=3000, hold_steps=150,
                      track_every=25, probe_every=100, probe_from_eos=True, track_k=1,
                      lanczos_iters=12, probe_points=33, num_random_directions=1,
                      probe_s_max=0.05, probe_s_max_steps=16.0, probe_s_max_theta=0.005,
                      num_bootstrap=2000, chunk_size=4096,
                      cost_note="per-run times measured on the shared 2-core CPU, load 6–8",
                      per_dataset={"mnist1d": dict(measured_seconds={1024: 30, 16384: 58})}),
    # Accelerators: N up to what each dataset allows (capped at its size), Fashion-MNIST with
    # an MLP and the CNN. Their η come from the CPU measurements above, at small N only (no
    # accelerator was lent to measure N = 60000): the MLP 4×32 at η = 0.11 is the smoke arm
    # (N = 256–1024, 17 of 18 runs held); the CNN 2×32 at η = 0.03 (measured once: N = 500,
    # seed 0): λ1·η/2 = 1.92 at initialization, 0.66 by step 20, through 0.9 at step 80 and
    # 0.95–1.08 from step 160. Larger N sharpens more slowly (MNIST-1D above), hence the
    # 20000-step cap; runs that still miss the edge are counted in runs_at_eos, not fitted.
    # * MNIST-1D architecture arms (issue 27): one full-batch GD setting each that enters and
    #   holds the edge of stability (lossland.eos, hold 50 steps, tracking every 5), measured
    #   2026-12-06 on the 2-core CPU shared with 3 other developers (load average ~9, so
    #   steps/s are lower bounds), N = 500, seed 0, MSE:
    #   - vit 2×32, patch 4, η = 0.06: λ1·η/2 = 283 at initialization (position embeddings),
    #     a catapult to 0.8, sharpening back; entered at step 500, held, stopped (eos_hold)
    #     at step 570; median λ1·η/2 while holding 0.919; χ_1 median 7e-11 (max 1e-9);
    #     1.52 steps/s (375 s).
    #   - resnet ResNet-8 (width 8), --norm=none, η = 0.15: λ1·η/2 ≈ 1.1 at initialization,
    #     falling below 0.9, sharpening back; entered at step 90, stopped (eos_hold) at step
    #     160; median λ1·η/2 from entry to stop 0.995; χ_1 median 0.79 (max 0.95); 1.11
    #     steps/s (144 s). η = 0.25 and 0.35 entered (steps ~30) but sat above the band
    #     (λ1·η/2 1.1–2.2) most of 250 steps.
    #   - resnet ResNet-8 (width 8), --norm=batch, --chunk_size=500 (one ghost batch),
    #     η = 0.14: λ1·η/2 0.99 at initialization, 0.74 by step 10, sharpening with a period-2
    #     oscillation; entered at step 155, stopped (eos_hold) at step 415; median λ1·η/2 from
    #     entry to stop 0.912; χ_1 median 0.79 (max 0.95); 0.80 steps/s (521 s).
    #   Commands: python -m experiments.train --dataset=mnist1d --n_train=500 --steps=800
    #     --track_every=5 --track_k=1 --lanczos_iters=20 --eos_hold_steps=50 --log_every=5 and
    #     --model=vit --depth=2 --width=32 --patch_size=4 --lr=0.06, or
    #     --model=resnet --depth=8 --width=8 --norm=none --lr=0.15, or
    #     --model=resnet --depth=8 --width=8 --norm=batch --chunk_size=500 --lr=0.14.
    #   The norm=batch arm is named resnet_bn (arms of one model need names of their own);
    #   its chunks of 500 divide every N of the grid (its ghost batches are part of the loss,
    #   sweep_n refuses a chunk that does not divide N). Larger N sharpens more slowly (the
    #   MLP above), hence the caps.
    "full": dict(dataset=["mnist1d", "fashion_mnist"],
                 n_values=[500, 1000, 2000, 4000, 8000, 16000, 32000, 60000],
                 seeds=[0, 1, 2, 3, 4], width=256, depth=2, lr=0.05, max_steps=20000,
                 hold_steps=1000, track_every=20, probe_every=500, track_k=5, lanczos_iters=40,
                 probe_points=41, num_random_directions=2, probe_s_max=0.05, num_bootstrap=5000,
                 per_dataset={"mnist1d": [
                     dict(model="mlp"),
                     dict(model="resnet", width=8, depth=8, norm="none", lr=0.15,
                          activations=["relu"]),
                     dict(arm="resnet_bn", model="resnet", width=8, depth=8, norm="batch",
                          chunk_size=500, lr=0.14, activations=["relu"]),
                     dict(model="vit", width=32, depth=2, patch_size=4, lr=0.06,
                          activations=["gelu"])],
                              "fashion_mnist": [
                     dict(model="mlp", width=32, depth=4, lr=0.11, activations=["relu"]),
                     dict(model="cnn", width=32, depth=2, lr=0.03, activations=["relu"])]}),
}
