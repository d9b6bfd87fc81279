import random, time
import numpy as np
from forge.dedup.minhash import MinHasher
from datatrove.pipeline.dedup.minhash import MinhashDedupSignature, MinhashConfig
from datatrove.utils.hashing import HashConfig
rng = random.Random(0)
vocab = [f"w{i}" for i in range(50000)]
docs = [" ".join(rng.choice(vocab) for _ in range(rng.randint(100, 500))) for _ in range(20000)]
mh = MinHasher(n_grams=5, num_hashes=112)
t = time.perf_counter()
for i in range(0, len(docs), 1000):
    mh.signatures(docs[i:i+1000])
f = time.perf_counter() - t
step = MinhashDedupSignature(output_folder="/tmp/dtsig", config=MinhashConfig(hash_config=HashConfig(hash_fc="sha1")))
t = time.perf_counter()
for d in docs:
    sh = step.get_shingles(d)
    if sh.size: step.get_signature(sh)
d = time.perf_counter() - t
print(f"forge {len(docs)/f:,.0f} docs/s  datatrove {len(docs)/d:,.0f} docs/s  ratio {d/f:.2f}x")
