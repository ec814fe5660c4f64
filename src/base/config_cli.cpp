#include "base/config_cli.hpp"

#include <fmt/format.h>

namespace dmakit::base {

namespace {

// The config file reader: CLI11's TOML parser, with [section] key flattened
// to the option "--section.key" and every key checked against the table.
class FlatToml : public CLI::ConfigTOML {
 public:
  FlatToml(const CLI::App* app, std::vector<SettingCheck> keys) : app_(app), keys_(std::move(keys)) {}

  std::vector<CLI::ConfigItem> from_config(std::istream& in) const override {
    const CLI::Option* opt = app_->get_option_no_throw("--config");
    std::string file = opt != nullptr ? opt->as<std::string>() : std::string("config");
    std::vector<CLI::ConfigItem> out;
    for (auto& item : CLI::ConfigTOML::from_config(in)) {
      if (item.name == "++" || item.name == "--") continue;  // section markers
      std::string key;
      for (const auto& p : item.parents) key += p + ".";
      key += item.name;
      const SettingCheck* s = nullptr;
      for (const auto& candidate : keys_)
        if (candidate.key == key) s = &candidate;
      if (s == nullptr)
        throw CLI::ConfigError(fmt::format("{}: key '{}': unknown setting", file, key));
      if (item.inputs.size() != 1)
        throw CLI::ConfigError(fmt::format("{}: key '{}': expected one value", file, key));
      if (auto st = s->check(item.inputs.front()); !st)
        throw CLI::ConfigError(fmt::format("{}: {}", file, st.error().message));
      CLI::ConfigItem flat;
      flat.name = key;
      flat.inputs = item.inputs;
      out.push_back(std::move(flat));
    }
    return out;
  }

 private:
  const CLI::App* app_;
  std::vector<SettingCheck> keys_;
};

}  // namespace

void add_config_file_option(CLI::App& app, std::string default_path, std::vector<SettingCheck> keys) {
  app.set_config("--config", std::move(default_path), "TOML config file (see config/dmakit.toml)", false)
      ->check(CLI::Validator(
          [](std::string& path) -> std::string {
            auto st = check_config_file(path);
            return st ? std::string() : st.error().message;
          },
          "FILE", "config file"));
  app.config_formatter(std::make_shared<FlatToml>(&app, std::move(keys)));
  app.allow_config_extras(CLI::config_extras_mode::error);
}

std::string describe_parse_error(const CLI::Error& e) {
  // Config-file errors already carry "file: key 'k': reason".
  return e.what();
}

}  // namespace dmakit::base
