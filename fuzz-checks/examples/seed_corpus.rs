//! Writes seed inputs to `fuzz/corpus/<target>/` and hand-made hostile ones to `fuzz/regressions/<target>/`.

use std::path::Path;

fn main() -> std::io::Result<()> {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let sets = [("corpus", fuzz_checks::seeds::corpus()), ("regressions", fuzz_checks::seeds::hostile())];
    for (kind, seeds) in sets {
        for (target, name, bytes) in seeds {
            let dir = fuzz.join(kind).join(target);
            std::fs::create_dir_all(&dir)?;
            std::fs::write(dir.join(&name), &bytes)?;
            println!("{kind}/{target}/{name}: {} bytes", bytes.len());
        }
    }
    Ok(())
}
