//! Which program a project runs: its `run` setting when it has one, otherwise a guess from its
//! files (and its `language` setting, when several languages are present).

use sync_core::tree::Settings;

use crate::job::SandboxCommand;
use crate::run::Program;

/// Entry points tried in order for each language, then any single file of that language.
const LANGUAGES: &[Language] = &[
    Language { name: "python", extensions: &["py"], entries: &["main.py", "app.py", "__main__.py"] },
    Language { name: "c", extensions: &["c"], entries: &["main.c"] },
    Language { name: "cpp", extensions: &["cpp", "cc", "cxx"], entries: &["main.cpp", "main.cc"] },
    Language { name: "javascript", extensions: &["js", "mjs"], entries: &["index.js", "main.js", "index.mjs"] },
    Language { name: "bash", extensions: &["sh"], entries: &["main.sh", "run.sh"] },
];

struct Language {
    name: &'static str,
    extensions: &'static [&'static str],
    entries: &'static [&'static str],
}

/// Why nothing can be run; the message is shown to the person who pressed Run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoProgram {
    #[error("nothing to run: add a main.py, main.c, main.cpp, index.js or main.sh, or set the project's run command")]
    NoEntryPoint,
    #[error("several files could be the program ({0}): name one main, or set the project's run command")]
    Ambiguous(String),
    #[error("unknown language {0:?}")]
    UnknownLanguage(String),
}

/// The program of a project with `settings` and files at `paths` (workspace-relative).
pub fn program_for(settings: &Settings, paths: &[String]) -> Result<Program, NoProgram> {
    if let Some(run) = settings.run.as_deref().map(str::trim).filter(|r| !r.is_empty()) {
        return Ok(Program { compile: None, run: SandboxCommand::new("/bin/sh", ["-c", run]) });
    }
    let languages: Vec<&Language> = match settings.language.as_deref() {
        Some(name) => {
            vec![LANGUAGES.iter().find(|l| l.name == name).ok_or_else(|| NoProgram::UnknownLanguage(name.to_owned()))?]
        }
        None => LANGUAGES.iter().collect(),
    };
    for language in &languages {
        if let Some(entry) = language.entries.iter().find(|e| paths.iter().any(|p| p == *e)) {
            return Ok(program(language, entry));
        }
    }
    let mut candidates: Vec<(&Language, &String)> = Vec::new();
    for language in &languages {
        candidates.extend(
            paths.iter().filter(|p| language.extensions.iter().any(|e| has_extension(p, e))).map(|p| (*language, p)),
        );
    }
    match candidates.as_slice() {
        [] => Err(NoProgram::NoEntryPoint),
        [(language, path)] => Ok(program(language, path)),
        many => Err(NoProgram::Ambiguous(many.iter().map(|(_, p)| p.as_str()).collect::<Vec<_>>().join(", "))),
    }
}

fn has_extension(path: &str, extension: &str) -> bool {
    path.rsplit_once('.').is_some_and(|(stem, ext)| !stem.is_empty() && !stem.ends_with('/') && ext == extension)
}

fn program(language: &Language, path: &str) -> Program {
    let compiled = |compiler: &str| Program {
        compile: Some(SandboxCommand::new(compiler, ["-O2", "-o", "a.out", path, "-lm"])),
        run: SandboxCommand::new("./a.out", Vec::<String>::new()),
    };
    match language.name {
        "python" => Program::python(path),
        "c" => compiled("/usr/bin/gcc"),
        "cpp" => compiled("/usr/bin/g++"),
        // V8 reserves over 512 MiB of address space for JIT code alone, more than a run's
        // memory limit (RLIMIT_AS); without the JIT it fits, at the cost of compute speed.
        "javascript" => Program { compile: None, run: SandboxCommand::new("/usr/bin/node", ["--jitless", path]) },
        _ => Program { compile: None, run: SandboxCommand::new("/bin/bash", [path]) },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    fn run_line(p: &Program) -> String {
        std::iter::once(p.run.program.as_str())
            .chain(p.run.args.iter().map(String::as_str))
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn the_run_setting_wins() {
        let settings = Settings { run: Some("python3 tool.py --fast".into()), language: None };
        let p = program_for(&settings, &paths(&["main.c"])).unwrap();
        assert_eq!(run_line(&p), "/bin/sh -c python3 tool.py --fast");
        assert!(p.compile.is_none());
    }

    #[test]
    fn entry_points_then_single_files() {
        let none = Settings::default();
        assert_eq!(run_line(&program_for(&none, &paths(&["util.py", "main.py"])).unwrap()), "/usr/bin/python3 main.py");
        assert_eq!(
            run_line(&program_for(&none, &paths(&["src/solve.py", "README.md"])).unwrap()),
            "/usr/bin/python3 src/solve.py"
        );
        let c = program_for(&none, &paths(&["main.c", "notes.txt"])).unwrap();
        assert_eq!(c.compile.as_ref().map(|c| c.program.as_str()), Some("/usr/bin/gcc"));
        assert_eq!(run_line(&c), "./a.out");
        let cpp = program_for(&none, &paths(&["main.cpp"])).unwrap();
        assert_eq!(cpp.compile.as_ref().map(|c| c.program.as_str()), Some("/usr/bin/g++"));
        assert_eq!(run_line(&program_for(&none, &paths(&["index.js"])).unwrap()), "/usr/bin/node --jitless index.js");
        assert_eq!(run_line(&program_for(&none, &paths(&["main.sh"])).unwrap()), "/bin/bash main.sh");
    }

    #[test]
    fn clear_errors_when_there_is_no_single_answer() {
        let none = Settings::default();
        assert_eq!(program_for(&none, &paths(&["README.md", ".py"])).err(), Some(NoProgram::NoEntryPoint));
        assert!(matches!(program_for(&none, &paths(&["a.py", "b.py"])), Err(NoProgram::Ambiguous(_))));
        let python = Settings { run: None, language: Some("python".into()) };
        assert_eq!(run_line(&program_for(&python, &paths(&["main.c", "x.py"])).unwrap()), "/usr/bin/python3 x.py");
        let cobol = Settings { run: None, language: Some("cobol".into()) };
        assert_eq!(program_for(&cobol, &paths(&["main.py"])).err(), Some(NoProgram::UnknownLanguage("cobol".into())));
        let blank = Settings { run: Some("   ".into()), language: None };
        assert_eq!(run_line(&program_for(&blank, &paths(&["main.py"])).unwrap()), "/usr/bin/python3 main.py");
    }
}
