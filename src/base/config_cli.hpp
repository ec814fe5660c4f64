// Reading settings from flags and a TOML file with CLI11. Only .cpp files and
// the tool include this header, so CLI11 reaches no layer's interface; the
// table of settings it reads is core/config.hpp's.
#pragma once

#include <CLI/CLI.hpp>

#include <functional>
#include <string>
#include <vector>

#include "base/config.hpp"
#include "base/error.hpp"

namespace dmakit::base {

// A setting as the file reader sees it: its dotted key and the check of a
// textual value.
struct SettingCheck {
  std::string key;
  std::function<Status(const std::string&)> check;
};

// Adds "--config FILE" (default_path when not given) to app. The file is
// TOML; [section] key is the option "--section.key", a key not in `keys` is
// an error naming the file and key, and each value is checked by its key's
// check before CLI11 applies it. Flags given on the command line override the
// file. Add the settings' flags (add_setting_flag) after this.
void add_config_file_option(CLI::App& app, std::string default_path, std::vector<SettingCheck> keys);

// Adds the option `name` whose text is parsed by parse_value<T> (not
// CLI11's own conversion, which reads "010" as octal and wraps "-1") and
// handed to on_value; a bad value is a usage error with parse_value's
// message, which names `key`.
template <class T, class OnValue>
CLI::Option* add_parsed_option(CLI::App& app, const std::string& name, const std::string& key,
                               const std::string& help, OnValue on_value) {
  return app.add_option_function<std::string>(
      name,
      [key, on_value](const std::string& text) {
        auto v = parse_value<T>(key, text);
        if (!v) throw CLI::ValidationError(v.error().message);
        on_value(std::move(*v));
      },
      help);
}

// Adds the setting `key` as the flag "--key" bound to field, in the
// "Settings" group, showing its default; parsed as add_parsed_option does,
// so a flag and a file line read the same.
template <class T>
CLI::Option* add_setting_flag(CLI::App& app, const std::string& key, const std::string& help, T& field) {
  return add_parsed_option<T>(app, "--" + key, key, help, [&field](T v) { field = std::move(v); })
      ->default_str(show_value(field))
      ->group("Settings");
}

// Turns a CLI11 parse error into one line naming the file and key when the
// error came from the config file.
std::string describe_parse_error(const CLI::Error& e);

}  // namespace dmakit::base
