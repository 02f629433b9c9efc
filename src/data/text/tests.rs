use super::*;

fn write(dir: &Path, name: &str, content: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, content).unwrap();
    p
}

fn read(path: &Path) -> Result<TextFile> {
    read_text_file(path, &TextColumns::default(), true)
}

fn error(result: Result<TextFile>) -> String {
    format!("{:#}", result.unwrap_err())
}

#[test]
fn reads_glue_tsv_csv_and_jsonl() -> Result<()> {
    let d = tempfile::tempdir()?;
    let tsv = write(d.path(), "a.tsv", "sentence\tlabel\nit 's \"great\" \t1\na dull , tired film \t0\n");
    let file = read(&tsv)?;
    assert_eq!(file.examples[0], TextExample { text: "it 's \"great\"".into(), text_pair: None, label: Some("1".into()), line: 2 });
    assert_eq!(file.examples.len(), 2);
    let csv = write(d.path(), "b.csv", "id,text,label\n1,\"hello, world\",pos\n2,bye,neg\n");
    let file = read(&csv)?;
    assert_eq!(file.examples[0].text, "hello, world");
    let labels = LabelSet::from_examples(&file.examples);
    assert_eq!(labels.names, vec!["neg", "pos"]);
    assert_eq!(labels.id("pos")?, 1);
    assert!(labels.id("meh").is_err());
    assert_eq!(file.class_ids(&labels)?, [1, 0]);
    let jsonl = write(d.path(), "c.jsonl", "{\"text\": \"a\", \"label\": 10}\n\n{\"text\": \"b\", \"label\": 2}\n");
    let file = read(&jsonl)?;
    assert_eq!(LabelSet::from_examples(&file.examples).names, vec!["2", "10"]);
    assert_eq!(file.examples[1].line, 3);
    Ok(())
}

#[test]
fn sentence_pair_layouts_of_glue_are_detected() -> Result<()> {
    let d = tempfile::tempdir()?;
    let cases = [
        ("mrpc.tsv", "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\tHe said .\tHe stated .\n", "#1 String", "#2 String", "Quality"),
        ("qnli.tsv", "index\tquestion\tsentence\tlabel\n0\tWho ?\tHim .\tentailment\n", "question", "sentence", "label"),
        ("rte.tsv", "index\tsentence1\tsentence2\tlabel\n0\tA .\tB .\tnot_entailment\n", "sentence1", "sentence2", "label"),
        ("mnli.tsv", "index\tgenre\tsentence1\tsentence2\tlabel1\tgold_label\n0\tfiction\tA .\tB .\tneutral\tneutral\n", "sentence1", "sentence2", "gold_label"),
        ("stsb.tsv", "index\tgenre\tsentence1\tsentence2\tscore\n0\tnews\tA .\tB .\t3.800\n", "sentence1", "sentence2", "score"),
        ("qqp.csv", "id,qid1,qid2,question1,question2,is_duplicate\n0,1,2,How?,Why?,0\n", "question1", "question2", "is_duplicate"),
        ("snli.jsonl", "{\"premise\": \"A .\", \"hypothesis\": \"B .\", \"label\": 1}\n", "premise", "hypothesis", "label"),
    ];
    for (name, content, a, b, label) in cases {
        let file = read(&write(d.path(), name, content))?;
        let want = ChosenColumns { text: a.into(), text_pair: Some(b.into()), label: Some(label.into()) };
        assert_eq!(file.columns, want, "{name}");
        assert!(file.examples[0].text_pair.is_some(), "{name}");
    }
    Ok(())
}

#[test]
fn columns_chosen_by_name() -> Result<()> {
    let d = tempfile::tempdir()?;
    let p = write(d.path(), "x.tsv", "body\tanswer\tstars\nnice\tyes\t5\n");
    let asked = TextColumns { text: Some("body".into()), text_pair: Some("answer".into()), label: Some("stars".into()) };
    let file = read_text_file(&p, &asked, true)?;
    assert_eq!(file.examples[0], TextExample { text: "nice".into(), text_pair: Some("yes".into()), label: Some("5".into()), line: 2 });
    // Only the pair named: its text is the partner of a known layout, else a known text column.
    let p = write(d.path(), "y.tsv", "sentence1\tsentence2\tsentence\tlabel\na\tb\tc\t0\n");
    let file = read_text_file(&p, &TextColumns { text_pair: Some("sentence2".into()), ..Default::default() }, true)?;
    assert_eq!((file.examples[0].text.as_str(), file.examples[0].text_pair.as_deref()), ("a", Some("b")));
    // A text column named alone means single texts, even where a pair layout exists.
    let file = read_text_file(&p, &TextColumns { text: Some("sentence".into()), ..Default::default() }, true)?;
    assert_eq!(file.columns.text_pair, None);
    // Unknown names list the file's columns.
    let err = error(read_text_file(&p, &TextColumns { label: Some("gold".into()), ..Default::default() }, true));
    assert!(err.contains("y.tsv") && err.contains("no label column \"gold\"") && err.contains("sentence2"), "{err}");
    let err = error(read_text_file(&p, &TextColumns { text_pair: Some("nope".into()), ..Default::default() }, false));
    assert!(err.contains("no text pair column \"nope\""), "{err}");
    Ok(())
}

#[test]
fn malformed_files_name_file_line_and_column() -> Result<()> {
    let d = tempfile::tempdir()?;
    let cases = [
        ("x.tsv", "sentence\tlabel\n", "x.tsv: no examples"),
        ("empty.tsv", "", "empty.tsv: no text column"),
        ("empty.jsonl", "\n\n", "empty.jsonl: no examples"),
        ("y.tsv", "sentence\tlabel\nok\t1\nbroken line\n", "y.tsv line 3: 1 fields, the header has 2"),
        ("long.tsv", "sentence\tlabel\nok\t1\ttoo\tmany\n", "long.tsv line 2: 4 fields"),
        ("z.jsonl", "{\"text\": \"a\", \"label\": 1}\n{oops\n", "z.jsonl line 2: not valid JSON"),
        ("k.jsonl", "{\"text\": \"a\", \"label\": 1}\n{\"text\": \"b\"}\n", "k.jsonl line 2: no field \"label\""),
        ("n.jsonl", "{\"text\": null, \"label\": 1}\n", "n.jsonl line 1: field \"text\" is not a string"),
        ("w.tsv", "body\tlabel\nx\t1\n", "no text column (looked for [\"sentence\""),
        ("v.tsv", "sentence\tverdict\nx\t1\n", "v.tsv: no label column"),
        ("data.parquet", "", "unknown text format"),
    ];
    for (name, content, expected) in cases {
        let err = error(read(&write(d.path(), name, content)));
        assert!(err.contains(expected), "{name}: {err}");
    }
    let err = error(read(&d.path().join("w.tsv")));
    assert!(err.contains("the file's columns are [\"body\", \"label\"]"), "{err}");
    let file = read_text_file(&d.path().join("v.tsv"), &TextColumns::default(), false)?;
    assert!(!file.has_labels() && file.examples[0].label.is_none());
    Ok(())
}

#[test]
fn labels_become_class_ids_or_scores_with_errors_naming_the_row() -> Result<()> {
    let d = tempfile::tempdir()?;
    let p = write(d.path(), "s.tsv", "sentence1\tsentence2\tscore\na\tb\t3.8\nc\td\t0\ne\tf\tabout 2\n");
    let mut file = read(&p)?;
    let err = format!("{:#}", file.scores().unwrap_err());
    assert!(err.contains("s.tsv line 4, column \"score\"") && err.contains("\"about 2\" is not a finite number"), "{err}");
    assert!(!file.labels_look_like_scores());
    file.truncate(Some(2));
    assert_eq!(file.scores()?, [3.8, 0.0]);
    assert!(file.labels_look_like_scores());
    let model_labels = LabelSet { names: vec!["neg".into(), "pos".into()] };
    let err = format!("{:#}", file.class_ids(&model_labels).unwrap_err());
    assert!(err.contains("s.tsv line 2, column \"score\"") && err.contains("\"3.8\" is not one of the model's labels"), "{err}");
    // A config without names (LABEL_0, LABEL_1) takes GLUE's integer labels.
    let unnamed = LabelSet { names: vec!["LABEL_0".into(), "LABEL_1".into()] };
    assert_eq!(unnamed.id("1")?, 1);
    assert!(unnamed.id("2").is_err());
    let p = write(d.path(), "u.tsv", "sentence\nhello\n");
    let file = read_text_file(&p, &TextColumns::default(), false)?;
    assert!(file.scores().is_err() && file.class_ids(&unnamed).is_err());
    Ok(())
}
