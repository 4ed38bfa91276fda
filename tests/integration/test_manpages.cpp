// The man pages (docs/*.md) document exactly the options that the programs' --help lists, an exit
// status section that matches what the programs return, and examples.
#include <sys/stat.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <cctype>
#include <set>
#include <sstream>

#include "support.hpp"

using namespace itest;

namespace {

using Names = std::set<std::string>;

std::vector<std::string> lines_of(const std::string& text) {
    std::vector<std::string> out;
    std::istringstream ss(text);
    std::string line;
    while (std::getline(ss, line)) out.push_back(line);
    return out;
}

bool is_lower(char c) {
    return c >= 'a' && c <= 'z';
}
bool is_word(char c) {
    return is_lower(c) || (c >= '0' && c <= '9') || c == '_';
}

// "-h," -> "-h"; "--help" -> "--help"; "open=wait|eagain" -> "open="; "allow_other" ->
// "allow_other"; anything else (OPTIONS, SECS, (hex)) -> "".
std::string option_name(std::string token) {
    while (!token.empty() && (token.back() == ',' || token.back() == '.')) token.pop_back();
    if (token.rfind("-", 0) == 0) {
        size_t i = token.rfind("--", 0) == 0 ? 2 : 1;
        if (i >= token.size() || !std::isalpha(static_cast<unsigned char>(token[i]))) return "";
        for (; i < token.size(); ++i)
            if (!std::isalnum(static_cast<unsigned char>(token[i])) && token[i] != '-') return "";
        return token;
    }
    if (token.empty() || !is_lower(token[0])) return "";
    size_t n = 0;
    while (n < token.size() && is_word(token[n])) ++n;
    if (n < token.size() && token[n] == '=') ++n;
    return token.substr(0, n);
}

// Options in --help text: lines whose first word, after indentation, is an option ("-f",
// "-h, --help", "-h,--help", "open=wait|eagain ...") or a bare keyword set off by two spaces
// ("allow_other   let users ..."). Continuation lines of descriptions do not qualify.
Names help_options(const std::string& text) {
    Names out;
    for (const auto& line : lines_of(text)) {
        size_t b = line.find_first_not_of(' ');
        if (b == 0 || b == std::string::npos) continue;  // not indented, or blank
        size_t e = line.find(' ', b);
        std::string first = line.substr(b, e == std::string::npos ? std::string::npos : e - b);
        size_t next = e == std::string::npos ? e : line.find_first_not_of(' ', e);
        bool two_spaces = next != std::string::npos && next - e >= 2;
        bool option_like = first[0] == '-' || first.find('=') != std::string::npos ||
                           (two_spaces && is_lower(first[0]));
        if (!option_like) continue;
        std::stringstream parts(first);
        for (std::string part; std::getline(parts, part, ',');)
            if (auto n = option_name(part); !n.empty()) out.insert(n);
        if (first.back() == ',' && next != std::string::npos)  // "-h, --help"
            out.insert(option_name(line.substr(next, line.find(' ', next) - next)));
    }
    return out;
}

// The part of CLI11 help text under `header` ("Options:", "Subcommands:").
std::string cli11_section(const std::string& text, const std::string& header) {
    auto pos = text.find("\n" + header + "\n");
    if (pos == std::string::npos) return "";
    pos += header.size() + 2;
    auto end = text.find("\n\n", pos);
    return text.substr(pos, end == std::string::npos ? std::string::npos : end - pos);
}

// Markdown man page: the lines of the sections whose heading is in `headings` ("# OPTIONS",
// "## import NAME SOURCE", ...), up to the next heading of the same or a higher level.
std::string md_sections(const std::string& md, const std::set<std::string>& headings) {
    std::string out;
    int level = 0;  // of the section being copied; 0: not copying
    for (const auto& line : lines_of(md)) {
        if (line.rfind("#", 0) == 0) {
            int l = static_cast<int>(line.find(' '));
            if (level && l <= level) level = 0;
            if (headings.count(line)) level = l;
            continue;
        }
        if (level) out += line + "\n";
    }
    return out;
}

// Options in man page definition terms: lines starting with "**".
Names man_options(const std::string& section_text) {
    Names out;
    for (auto line : lines_of(section_text)) {
        if (line.rfind("**", 0) != 0) continue;
        line.erase(std::remove(line.begin(), line.end(), '*'), line.end());
        std::istringstream words(line);
        for (std::string w; words >> w;)
            if (auto n = option_name(w); !n.empty()) out.insert(n);
    }
    return out;
}

// The headings "## NAME ..." under `parent`, by first word.
Names md_subheadings(const std::string& md, const std::string& parent) {
    Names out;
    bool in = false;
    for (const auto& line : lines_of(md)) {
        if (line.rfind("# ", 0) == 0) in = line == parent;
        if (in && line.rfind("## ", 0) == 0) out.insert(line.substr(3, line.find(' ', 3) - 3));
    }
    return out;
}

std::string man_page(const std::string& name) {
    return read_file(std::string(IMAGEFS_SOURCE_DIR) + "/docs/" + name + ".md");
}

void require_sections(const std::string& md) {
    for (const char* h : {"# NAME", "# SYNOPSIS", "# DESCRIPTION", "# OPTIONS", "# EXIT STATUS",
                          "# EXAMPLES", "# SEE ALSO"}) {
        INFO(h);
        CHECK(md.find("\n" + std::string(h) + "\n") != std::string::npos);
    }
    CHECK(md_sections(md, {"# EXAMPLES"}).find("```") != std::string::npos);
}

}  // namespace

TEST_CASE("man pages: imagefsd(8) documents exactly the options of imagefsd --help", "[docs]") {
    auto help = run({IMAGEFSD, "--help"});
    REQUIRE(help.status == 0);
    Names from_help = help_options(help.out);
    std::string md = man_page("imagefsd.8");
    Names from_man = man_options(md_sections(md, {"# OPTIONS", "# MOUNT OPTIONS"}));
    CHECK(from_help.count("open=") == 1);  // the parser sees the -o options
    CHECK(from_help.count("allow_other") == 1);
    CHECK(from_help == from_man);
    require_sections(md);

    // EXIT STATUS says 0, 1 and 2; these are what imagefsd returns.
    CHECK(md_sections(md, {"# EXIT STATUS"}).find("**2**") != std::string::npos);
    TempDir t;
    CHECK(run({IMAGEFSD, "-o", "open=later", t / "s", t / "m"}).status == 2);
    CHECK(run({IMAGEFSD, "--frobnicate", t / "s", t / "m"}).status == 2);
    CHECK(run({IMAGEFSD, t / "s", t / "no such dir"}).status == 1);
}

TEST_CASE("man pages: imagefs(1) documents exactly the commands and options of imagefs --help",
          "[docs]") {
    std::string md = man_page("imagefs.1");
    require_sections(md);
    auto help = run({IMAGEFS_CLI, "--help"});
    REQUIRE(help.status == 0);
    CHECK(help_options(cli11_section(help.out, "Options:")) ==
          man_options(md_sections(md, {"# OPTIONS"})));

    Names commands = help_options(cli11_section(help.out, "Subcommands:"));
    CHECK(commands.size() >= 5);
    CHECK(commands == md_subheadings(md, "# COMMANDS"));
    for (const auto& cmd : commands) {
        INFO("imagefs " << cmd);
        auto h = run({IMAGEFS_CLI, cmd, "--help"});
        REQUIRE(h.status == 0);
        Names from_help = help_options(cli11_section(h.out, "Options:"));
        from_help.erase("-h");
        from_help.erase("--help");
        std::string heading;
        for (const auto& line : lines_of(md))
            if (line.rfind("## " + cmd, 0) == 0 &&
                (line.size() == cmd.size() + 3 || line[cmd.size() + 3] == ' '))
                heading = line;
        REQUIRE_FALSE(heading.empty());
        CHECK(from_help == man_options(md_sections(md, {heading})));
    }

    // EXIT STATUS: 0, 1, and 2 for a command line that cannot be used.
    TempDir t;
    CHECK(run({IMAGEFS_CLI, "--state", t / "s", "list"}).status == 1);  // no catalog there
    CHECK(run({IMAGEFS_CLI, "import"}).status == 2);
    CHECK(md_sections(md, {"# EXIT STATUS"}).find("**2**") != std::string::npos);
}

TEST_CASE("man pages: mount.imagefs(8) documents exactly the options of mount.imagefs --help",
          "[docs]") {
    TempDir t;
    auto inst = run({CMAKE_COMMAND, "--install", IMAGEFS_BUILD_DIR, "--prefix", t / "prefix"});
    REQUIRE(inst.status == 0);
    const std::string helper = t / "prefix/sbin/mount.imagefs";
    auto help = run({helper, "--help"});
    REQUIRE(help.status == 0);
    std::string md = man_page("mount.imagefs.8");
    require_sections(md);
    CHECK(help_options(help.out) == man_options(md_sections(md, {"# OPTIONS"})));

    // EXIT STATUS 1 for wrong arguments; 0 for a fake mount that checks them.
    CHECK(run({helper, t / "s"}).status == 1);
    CHECK(run({helper, t / "s", t / "m", "-x"}).status == 1);
    CHECK(run({helper, t / "s", t / "m", "-f", "-o", "allow_other"}).status == 0);
    struct stat st {};
    CHECK(::stat((t / "s").c_str(), &st) == -1);  // -f ran no daemon
}
